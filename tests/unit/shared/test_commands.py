from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.commands import CreateSegment, UpdateUserSegments, command_adapter, partition_key


def validate(raw):
    return command_adapter.validate_python(raw)


def test_create_segment_defaults_and_unknown_fields_ignored():
    command = validate({"type": "create_segment", "slug": "AVITO_VOICE_MESSAGES", "colour": "blue"})
    assert isinstance(command, CreateSegment)
    assert command.percent == 0
    assert partition_key(command) == b"AVITO_VOICE_MESSAGES"


@pytest.mark.parametrize("raw", [
    {"type": "create_segment", "slug": "has space"},
    {"type": "create_segment", "slug": ""},
    {"type": "create_segment", "slug": "x" * 129},
    {"type": "create_segment", "slug": "A", "percent": 100.01},
    {"type": "create_segment", "slug": "A", "percent": 1.234},
    {"type": "create_segment", "slug": "A", "percent": "10"},
    {"type": "create_segment", "slug": "A", "description": "x" * 1001},
    {"type": "create_segment", "slug": "A", "command_id": "x" * 65},
    {"type": "create_segment", "slug": "A", "actor": "x" * 129},
    {"type": "update_segment", "slug": "A"},
    {"type": "create_user", "user_id": 0},
    {"type": "create_user", "user_id": 2**63},
    {"type": "create_user", "user_id": "1000"},
    {"type": "create_user", "user_id": True},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "ttl_seconds": 0},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "ttl_seconds": 315360001},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "ttl_seconds": 5,
     "expires_at": "2999-01-01T00:00:00Z"},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "expires_at": "2000-01-01T00:00:00Z"},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "expires_at": "2999-01-01T00:00:00"},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"] * 1001},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "expires_at": 32503680000},
    {"type": "create_user", "user_id": 1, "issued_at": 0},
    {"type": "create_user", "user_id": 1000.5},
    {"type": "create_user", "user_id": float(2**60)},  # parsed JSON floats this large are not exact
    {"type": "update_segment", "slug": "A", "percent": None},  # optional, but not nullable
    {"type": "update_segment", "slug": "A", "description": None},
    {"type": "update_user_segments", "user_id": 1, "add": ["A"], "ttl_seconds": None,
     "expires_at": "2999-01-01T00:00:00Z"},
])
def test_field_rules_are_enforced(raw):
    with pytest.raises(ValidationError):
        validate(raw)


def test_expiry_from_ttl_or_timestamp():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    by_ttl = validate({"type": "update_user_segments", "user_id": 1, "add": ["A"], "ttl_seconds": 60})
    assert by_ttl.expiry_from(now) == now + timedelta(seconds=60)
    by_time = validate({"type": "update_user_segments", "user_id": 1, "add": ["A"],
                        "expires_at": "2999-01-01T03:00:00+03:00"})
    assert by_time.expiry_from(now) == datetime(2999, 1, 1, tzinfo=UTC)
    permanent = validate({"type": "update_user_segments", "user_id": 7, "add": ["A"]})
    assert isinstance(permanent, UpdateUserSegments) and permanent.expiry_from(now) is None
    assert partition_key(permanent) == b"7"


def test_whole_numbers_written_with_a_decimal_point_are_integers():
    """JSON Schema's integer includes 1000.0; the models agree, so what the schema allows is accepted."""
    command = validate({"type": "update_user_segments", "user_id": 1000.0, "add": ["A"], "ttl_seconds": 60.0})
    assert (command.user_id, command.ttl_seconds) == (1000, 60)
    assert type(command.user_id) is int and partition_key(command) == b"1000"


def test_optional_fields_that_refuse_null_do_not_advertise_a_null_default():
    schemas = command_adapter.json_schema()["$defs"]
    for model, field in [("UpdateSegment", "percent"), ("UpdateSegment", "description"),
                         ("UpdateUserSegments", "ttl_seconds"), ("UpdateUserSegments", "expires_at")]:
        field_schema = schemas[model]["properties"][field]
        assert "default" not in field_schema and "anyOf" not in field_schema
    assert schemas["CreateUser"]["properties"]["user_id"]["minimum"] == 1


@pytest.mark.parametrize(("field", "value"), [
    ("command_id", "x\ny"), ("command_id", "\x1b[2J"), ("command_id", "a\u202eb"), ("command_id", "a\x85b"),
    ("actor", "ops\r"), ("actor", "\x07"), ("description", "\x1b]0;title\x07"), ("description", "a\rb"),
])
def test_text_that_reaches_terminals_refuses_control_characters(field, value):
    with pytest.raises(ValidationError, match="must not contain control characters"):
        validate({"type": "create_segment", "slug": "A", field: value})


def test_a_description_may_span_lines():
    assert validate({"type": "create_segment", "slug": "A", "description": "one\n\ttwo"}).description == "one\n\ttwo"
