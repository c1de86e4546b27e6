"""What segmentctl prints of the wire cannot steer the terminal."""

from __future__ import annotations

import orjson

from segmentctl.cli import outcome_line
from segmentctl.output import json_text, shown

HOSTILE = 'x\n{"event":"FAKE"}\x1b[2J\x9b31m\u202egnp.exe'


def test_control_characters_are_shown_escaped():
    text = shown(HOSTILE)
    assert text == 'x\\n{"event":"FAKE"}\\x1b[2J\\x9b31m\\u202egnp.exe'
    assert shown(text) == text  # escaping twice changes nothing


def test_an_outcome_line_escapes_every_field():
    line = outcome_line({"processed_at": "2026-12-06T10:00:00Z", "status": "rejected", "type": "create_user\x1b",
                         "command_id": HOSTILE, "error": {"code": "c\r", "message": "m\x07"}})
    assert "\n" not in line and "\x1b" not in line and "\r" not in line and "\x07" not in line
    assert "\u202e" not in line and "\x9b" not in line
    assert "\\x1b[2J" in line and "c\\r: m\\x07" in line


def test_json_lines_stay_json_and_carry_no_raw_controls():
    text = json_text({"command_id": HOSTILE})
    assert orjson.loads(text) == {"command_id": HOSTILE}  # the same value, read back
    assert not any(character in text for character in "\n\x1b\x9b\u202e")


async def test_a_refused_key_is_its_own_exit_code_and_names_the_scope():
    import httpx
    import pytest

    from segmentctl.cli import EXIT_UNAUTHORIZED, EXIT_UNAVAILABLE, _exit_code
    from shared.query_client import QueryApiError, QueryClient

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": "the key 'w' does not have the scope 'status' this needs"})

    async with QueryClient("http://api.test", "k", transport=httpx.MockTransport(refuse)) as api:
        with pytest.raises(QueryApiError) as refused:
            await api.command_outcome("c-1")
    assert "scope 'status'" in str(refused.value) and _exit_code(refused.value) == EXIT_UNAUTHORIZED
    assert _exit_code(QueryApiError("unreachable")) == EXIT_UNAVAILABLE
