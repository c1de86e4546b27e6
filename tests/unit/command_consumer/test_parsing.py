import orjson
import pytest

from services.command_consumer.parsing import InvalidRecord, RecordRef, ValidCommand, parse_record

SEGMENTS_TOPIC = "segments.commands"


def parse(record_ref: RecordRef):
    return parse_record(record_ref, SEGMENTS_TOPIC, 2048)


def record(value: bytes, topic: str = "assignments.commands") -> RecordRef:
    return RecordRef(topic, 3, 42, b"1", value)


@pytest.mark.parametrize(("value", "code"), [
    (b"not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"type": "drop_table"}', "unknown_type"),
    (b'{"user_id": 1}', "unknown_type"),
    (b'{"type": "create_segment", "slug": "A"}', "wrong_topic"),
    (b'{"type": "create_user", "user_id": -1}', "invalid_field"),
    (b'{"type": "create_user", "user_id": 1, "pad": "' + b"x" * 3000 + b'"}', "too_large"),
])
def test_invalid_records_get_a_reason(value, code):
    parsed = parse(record(value))
    assert isinstance(parsed, InvalidRecord)
    assert parsed.code == code
    assert parsed.message


def test_command_id_defaults_to_the_record_position():
    parsed = parse(record(b'{"type": "create_user", "user_id": 1}'))
    assert isinstance(parsed, ValidCommand)
    assert parsed.command_id == "assignments.commands:3:42"


def test_invalid_record_keeps_a_valid_command_id():
    parsed = parse(record(b'{"type": "create_user", "user_id": "x", "command_id": "c-1"}'))
    assert isinstance(parsed, InvalidRecord) and parsed.command_id == "c-1"
    assert "user_id" in parsed.message


@pytest.mark.parametrize("field", ["command_id", "actor"])
def test_control_characters_in_free_text_are_invalid_and_never_become_the_outcomes_id(field):
    """The audit's terminal injection: a command id with a line break and escape sequences."""
    hostile = 'x\n{"event":"FAKE"}\u001b[2J'
    value = {"type": "create_user", "user_id": 1, "command_id": "c-2", field: hostile}
    parsed = parse(record(orjson.dumps(value)))
    assert isinstance(parsed, InvalidRecord) and parsed.code == "invalid_field"
    assert f"{field}: " in parsed.message and "control characters" in parsed.message
    assert parsed.command_id == ("assignments.commands:3:42" if field == "command_id" else "c-2")
