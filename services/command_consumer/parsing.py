"""Turns a Kafka record into a valid command or a reason why it is invalid (README: "The contract, in short",
Commands and Invalid records)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from shared.commands import (
    COMMAND_TYPES,
    SEGMENT_COMMAND_TYPES,
    USER_COMMAND_TYPES,
    Command,
    command_adapter,
    plain_text,
)
from shared.outcomes import ErrorCode
from shared.validation import sentence


@dataclass(frozen=True, slots=True)
class RecordRef:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @property
    def default_command_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def header(self, name: str) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


@dataclass(frozen=True, slots=True)
class ValidCommand:
    record: RecordRef
    command_id: str
    command: Command


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    record: RecordRef
    command_id: str
    type: str | None
    code: ErrorCode
    message: str


ParsedRecord = ValidCommand | InvalidRecord


def _derived_command_id(raw: object, record: RecordRef) -> str:
    if isinstance(raw, dict):
        command_id = raw.get("command_id")
        if isinstance(command_id, str) and 1 <= len(command_id) <= 64 and plain_text(command_id):
            return command_id
    return record.default_command_id




def parse_record(record: RecordRef, segments_topic: str, max_bytes: int) -> ParsedRecord:
    """The record as a valid command, or as invalid with the reason; `segments_topic` is where segment
    commands belong (user commands belong on the other), `max_bytes` the largest value accepted."""
    value = record.value or b""
    if len(value) > max_bytes:
        return InvalidRecord(record, record.default_command_id, None, ErrorCode.TOO_LARGE,
                             f"record of {len(value)} bytes is over the {max_bytes}-byte limit")
    try:  # the usual case in one pass; the slower path below explains what is wrong
        command = command_adapter.validate_json(value)
    except ValidationError:
        pass
    else:
        expected = SEGMENT_COMMAND_TYPES if record.topic == segments_topic else USER_COMMAND_TYPES
        if command.type in expected:
            return ValidCommand(record, command.command_id or record.default_command_id, command)
    return _explain_invalid(record, value, segments_topic)


def _explain_invalid(record: RecordRef, value: bytes, segments_topic: str) -> ParsedRecord:
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        return InvalidRecord(record, record.default_command_id, None, ErrorCode.INVALID_JSON,
                             f"not valid UTF-8 JSON: {error}")
    command_id = _derived_command_id(raw, record)
    if not isinstance(raw, dict):
        return InvalidRecord(record, command_id, None, ErrorCode.NOT_AN_OBJECT,
                             f"a command is a JSON object, got {type(raw).__name__}")
    command_type = raw.get("type")
    if command_type not in COMMAND_TYPES:
        return InvalidRecord(record, command_id, None, ErrorCode.UNKNOWN_TYPE,
                             f"unknown command type {command_type!r}; expected one of {sorted(COMMAND_TYPES)}")
    expected = SEGMENT_COMMAND_TYPES if record.topic == segments_topic else USER_COMMAND_TYPES
    if command_type not in expected:
        return InvalidRecord(record, command_id, command_type, ErrorCode.WRONG_TOPIC,
                             f"{command_type} does not belong on topic {record.topic}")
    try:
        command = command_adapter.validate_python(raw)
    except ValidationError as error:
        return InvalidRecord(record, command_id, command_type, ErrorCode.INVALID_FIELD, sentence(error))
    return ValidCommand(record, command.command_id or record.default_command_id, command)
