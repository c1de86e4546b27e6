"""schemathesis hooks for the HTTP fuzzing test.

A JSON Schema cannot say "in the future": a schema-valid `expires_at` in the past is refused with
422 by design (tests/unit/test_commands.py and the API tests cover that). Generated past times are
moved to the future so the positive-data check judges the rest of the command.
"""

from __future__ import annotations

from datetime import UTC, datetime

import schemathesis


def _in_the_future(body):
    if isinstance(body, dict) and isinstance(body.get("expires_at"), str):
        try:
            moment = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        except ValueError:
            return body  # not a timestamp: negative data, left as generated
        if moment.tzinfo is not None and moment <= datetime.now(UTC):
            return {**body, "expires_at": "2999-01-01T00:00:00Z"}
    return body


@schemathesis.hook
def map_body(context, body):
    return _in_the_future(body)


@schemathesis.hook
def map_case(context, case):  # the stateful phase builds cases without map_body
    case.body = _in_the_future(case.body)
    return case
