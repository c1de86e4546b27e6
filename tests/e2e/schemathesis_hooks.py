"""schemathesis hooks for the HTTP fuzzing tests.

A JSON Schema cannot say "in the future": a schema-valid `expires_at` in the past is refused with
422 by design (tests/unit/shared/test_commands.py and the API tests cover that). Generated past times are
moved to the future so the positive-data check judges the rest of the command.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import schemathesis
from schemathesis.specs.openapi.adapter.security import declares_security


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


@schemathesis.check
def refused_without_a_key(ctx, response, case):
    """For the run without an API key: every operation that declares the bearer scheme answers 401."""
    same_method = case.method.upper() == case.operation.method.upper()  # not the coverage phase's TRACE probes
    if os.environ.get("EXPECT_UNAUTHENTICATED") and same_method and declares_security(case.operation):
        if response.status_code != 401:
            raise AssertionError(f"{case.operation.label} answered {response.status_code} without an API key, "
                                 "not 401")
