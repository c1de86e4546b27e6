"""Outcome of one consumed command (README: "The contract, in short", Outcomes): the row stored in
`command_outcomes`, the JSON published to the results topic and served by GET /commands/{id}."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class Status(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"
    INVALID = "invalid"


class ErrorCode(StrEnum):
    # Business rules (status rejected).
    SEGMENT_EXISTS = "segment_exists"
    SEGMENT_NOT_FOUND = "segment_not_found"
    CONFLICTING_SEGMENTS = "conflicting_segments"
    TOO_OLD = "too_old"  # the record is older than the inbox window (OUTCOME_RETENTION): it cannot be checked
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
                    "actor": "checkout",
                    "consistency_token": "0/16B3748",
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
    actor: str | None = Field(None, description="who issued the command: its `actor`; through POST /commands "
                                                "with access control on, the name of the caller's API key")
    consistency_token: str | None = Field(
        None, description="a WAL position at or after the command's commit; a read that passes it (header "
                          "X-Consistency-Token) is answered only by a server that has replayed it")


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, as in the contract's example."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:23] + "Z"


class OutcomeRow(NamedTuple):
    """One outcome as stored: its fields are the columns of `command_outcomes`, in order, so a
    row is copied into the table as it is. `contract()` is the JSON every reader sees."""

    command_id: str
    type: str | None
    status: str
    error: dict[str, str] | None
    result: dict[str, Any] | None
    processed_at: datetime
    source_topic: str
    source_partition: int
    source_offset: int
    actor: str | None = None  # who issued the command
    recorded_at: datetime | None = None  # the command record's Kafka timestamp: the inbox's partition key
    subject_user_id: int | None = None  # the user a user command was about
    subject_slug: str | None = None  # the segment a segment command was about

    @classmethod
    def from_record(cls, record) -> OutcomeRow:
        """From a database record selected with OUTCOME_COLUMNS."""
        return cls(*(record[name] for name in OUTCOME_COLUMNS))

    def contract(self, consistency_token: str | None = None) -> dict[str, Any]:
        """The contract's outcome object; `consistency_token` is a WAL position at or after the
        command's commit (known only after it, so not stored: see the README)."""
        return {
            "command_id": self.command_id,
            "type": self.type,
            "status": self.status,
            "error": self.error,
            "result": self.result,
            "processed_at": format_timestamp(self.processed_at),
            "source": {"topic": self.source_topic, "partition": self.source_partition,
                       "offset": self.source_offset},
            "actor": self.actor,
            "consistency_token": consistency_token,
        }


OUTCOME_COLUMNS = OutcomeRow._fields
OUTCOME_SELECT = f"SELECT {', '.join(OUTCOME_COLUMNS)} FROM command_outcomes"
