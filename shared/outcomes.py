"""Outcome of one consumed command (CONTRACT: outcome), stored and published to the results topic."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class Status(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"
    INVALID = "invalid"


class ErrorCode(StrEnum):
    # Business rules (status rejected).
    SEGMENT_EXISTS = "segment_exists"
    SEGMENT_NOT_FOUND = "segment_not_found"
    CONFLICTING_SEGMENTS = "conflicting_segments"
    # Record problems (status invalid, record dead-lettered).
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    WRONG_TOPIC = "wrong_topic"
    INVALID_FIELD = "invalid_field"
    TOO_LARGE = "too_large"


class OutcomeError(BaseModel):
    code: str
    message: str


class OutcomeSource(BaseModel):
    topic: str
    partition: int
    offset: int


class Outcome(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "command_id": "c-42",
                    "type": "update_user_segments",
                    "status": "applied",
                    "error": None,
                    "result": {"added": ["A"], "removed": [], "unchanged": [], "expires_at": None},
                    "processed_at": "2026-11-28T10:00:00.123Z",
                    "source": {"topic": "assignments.commands", "partition": 3, "offset": 1042},
                }
            ]
        }
    )

    command_id: str
    type: str | None
    status: Status
    error: OutcomeError | None = None
    result: dict[str, Any] | None = None
    processed_at: datetime
    source: OutcomeSource


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, as in the contract's example."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:23] + "Z"


def outcome_from_record(row) -> dict[str, Any]:
    """The contract's outcome object from a `command_outcomes` row."""
    return {
        "command_id": row["command_id"],
        "type": row["type"],
        "status": row["status"],
        "error": row["error"],
        "result": row["result"],
        "processed_at": format_timestamp(row["processed_at"]),
        "source": {"topic": row["source_topic"], "partition": row["source_partition"],
                   "offset": row["source_offset"]},
    }
