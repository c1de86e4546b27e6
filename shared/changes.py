"""The membership-changes stream's events (docs/contract.md, Membership changes): their schema, how a
change recorded in PostgreSQL becomes one, and how a reader turns a record back into one.

A `membership` event is one history row: one user entered or left one segment explicitly, by TTL
expiry or by the segment's deletion, keyed by the user id. A `rollout` event is one rollout
event: a segment's percent changed, keyed by `segment:<slug>`; it names the bucket range that
entered or left, never the users (a reader applies the bucket rule, shared/rollout.py).
An event's id is derived from the row it comes from, so a change published twice carries the
same id and readers deduplicate by it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.outcomes import format_timestamp
from shared.rollout import rollout_threshold

KIND_HEADER = "event-kind"
ID_HEADER = "event-id"


class MembershipChange(BaseModel):
    """One user entered (`I`) or left (`D`) one segment: the history row of that change."""

    model_config = ConfigDict(frozen=True, json_schema_extra={"examples": [{
        "event_id": "membership-1042", "kind": "membership", "user_id": 1000, "segment": "AVITO_VOICE_MESSAGES",
        "operation": "I", "source": "manual", "reason": "manual", "executed_at": "2026-12-06T10:00:00.123Z",
        "expires_at": None, "command_id": "c-1"}]})

    event_id: str = Field(description="Stable: a change published twice carries the same id.")
    kind: Literal["membership"] = "membership"
    user_id: int
    segment: str
    operation: Literal["I", "D"] = Field(description="I: entered; D: left.")
    source: Literal["manual", "auto"]
    reason: Literal["manual", "ttl", "segment_deleted", "percent_changed", "created"]
    executed_at: datetime = Field(description="As in the history and the month's report.")
    expires_at: datetime | None = Field(None, description=(
        "The membership's expiry at the change: the TTL given on entry, the expiry reached on a TTL exit."))
    command_id: str | None = Field(None, description="The command behind the change; null for TTL exits.")

    @property
    def key(self) -> str:
        return str(self.user_id)


class RolloutChange(BaseModel):
    """A segment's percent changed: created with one, updated, or deleted while it had one."""

    model_config = ConfigDict(frozen=True, json_schema_extra={"examples": [{
        "event_id": "rollout-17", "kind": "rollout", "segment": "AVITO_DISCOUNT_30", "from_percent": 10,
        "to_percent": 30, "reason": "percent_changed", "buckets_entered": [1000, 3000], "buckets_left": None,
        "executed_at": "2026-12-06T10:00:00.123Z", "command_id": "c-7"}]})

    event_id: str = Field(description="Stable: a change published twice carries the same id.")
    kind: Literal["rollout"] = "rollout"
    segment: str
    from_percent: float
    to_percent: float
    reason: Literal["created", "percent_changed", "segment_deleted"]
    buckets_entered: tuple[int, int] | None = Field(None, description=(
        "Half-open [from, to) range of the 10,000 buckets now covered; users explicitly removed stay out."))
    buckets_left: tuple[int, int] | None = Field(None, description=(
        "Half-open [from, to) range of the buckets no longer covered; explicit members stay in."))
    executed_at: datetime
    command_id: str | None = None

    @property
    def key(self) -> str:
        return f"segment:{self.segment}"

    def moves(self, bucket: int) -> Literal["I", "D"] | None:
        """What this change means for a user in `bucket` with no explicit membership or exclusion."""
        if self.buckets_entered and self.buckets_entered[0] <= bucket < self.buckets_entered[1]:
            return "I"
        if self.buckets_left and self.buckets_left[0] <= bucket < self.buckets_left[1]:
            return "D"
        return None


Change = Annotated[MembershipChange | RolloutChange, Field(discriminator="kind")]
_CHANGE = TypeAdapter(Change)

# The outbox columns (migrations/0007) the publisher reads: an entry holds one statement's changes
# as parallel arrays, one element per change.
OUTBOX_COLUMNS = ("seq", "kinds", "source_ids", "user_ids", "segment_slugs", "operations", "executed_ats", "sources",
                  "reasons", "command_ids", "expires_ats", "from_percents", "to_percents", "written_at")
CHANGE_FIELDS = ("kind", "source_id", "user_id", "segment_slug", "operation", "executed_at", "source", "reason",
                 "command_id", "expires_at", "from_percent", "to_percent")


def entry_changes(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The changes of one outbox entry, in the order its statement wrote them."""
    columns = [entry[name] for name in OUTBOX_COLUMNS[1:-1]]
    return [dict(zip(CHANGE_FIELDS, values, strict=True)) for values in zip(*columns, strict=True)]


def event_id(kind: str, source_id: int) -> str:
    return f"{kind}-{source_id}"


def bucket_ranges(from_percent: Decimal | float, to_percent: Decimal | float
                  ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(entered, left) bucket ranges of a percent change, each half-open or None."""
    before, after = rollout_threshold(from_percent), rollout_threshold(to_percent)
    if after > before:
        return (before, after), None
    if after < before:
        return None, (after, before)
    return None, None


def from_outbox(row: Mapping[str, Any]) -> MembershipChange | RolloutChange:
    """The event of one change of an outbox entry (`entry_changes`)."""
    if row["kind"] == "membership":
        return MembershipChange(
            event_id=event_id("membership", row["source_id"]), user_id=row["user_id"], segment=row["segment_slug"],
            operation=row["operation"], source=row["source"], reason=row["reason"], executed_at=row["executed_at"],
            expires_at=row["expires_at"], command_id=row["command_id"])
    entered, left = bucket_ranges(row["from_percent"], row["to_percent"])
    return RolloutChange(
        event_id=event_id("rollout", row["source_id"]), segment=row["segment_slug"],
        from_percent=float(row["from_percent"]), to_percent=float(row["to_percent"]), reason=row["reason"],
        buckets_entered=entered, buckets_left=left, executed_at=row["executed_at"], command_id=row["command_id"])


def encode(change: MembershipChange | RolloutChange) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the record that carries `change`."""
    body = change.model_dump()
    for name in ("executed_at", "expires_at"):
        if body.get(name) is not None:
            body[name] = format_timestamp(body[name])
    for name in ("buckets_entered", "buckets_left"):
        if body.get(name) is not None:
            body[name] = list(body[name])
    value = orjson.dumps(body)
    headers = [(KIND_HEADER, change.kind.encode()), (ID_HEADER, change.event_id.encode())]
    return change.key.encode(), value, headers


def record_of(change: Mapping[str, Any]) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """`encode(from_outbox(change))`, built directly: the publisher's path, where a model per
    change would cost more than the rest of publishing it (tests/unit/shared/test_changes.py
    holds the two to the same bytes)."""
    kind, source_id = change["kind"], change["source_id"]
    identifier = f"{kind}-{source_id}"
    executed_at = _timestamp(change["executed_at"])
    if kind == "membership":
        expires_at = change["expires_at"]
        body = {"event_id": identifier, "kind": kind, "user_id": change["user_id"], "segment": change["segment_slug"],
                "operation": change["operation"], "source": change["source"], "reason": change["reason"],
                "executed_at": executed_at, "expires_at": _timestamp(expires_at) if expires_at else None,
                "command_id": change["command_id"]}
        key = str(change["user_id"]).encode()
    else:
        entered, left = bucket_ranges(change["from_percent"], change["to_percent"])
        body = {"event_id": identifier, "kind": kind, "segment": change["segment_slug"],
                "from_percent": float(change["from_percent"]), "to_percent": float(change["to_percent"]),
                "reason": change["reason"], "buckets_entered": list(entered) if entered else None,
                "buckets_left": list(left) if left else None, "executed_at": executed_at,
                "command_id": change["command_id"]}
        key = f"segment:{change['segment_slug']}".encode()
    return key, orjson.dumps(body), [(KIND_HEADER, kind.encode()), (ID_HEADER, identifier.encode())]


# The changes of one statement share their times (a batch's `now`, an expiry's moment): each is
# formatted once.
_timestamp = functools.lru_cache(maxsize=4096)(format_timestamp)


def decode(value: bytes) -> MembershipChange | RolloutChange:
    """A record's value as its event; raises pydantic.ValidationError when it is not one."""
    return _CHANGE.validate_json(value)


def describe(change: MembershipChange | RolloutChange) -> str:
    """One line in words, as `segmentctl watch` prints it."""
    at = format_timestamp(change.executed_at)
    by = f" (command {change.command_id})" if change.command_id else ""
    if isinstance(change, MembershipChange):
        verb = "entered" if change.operation == "I" else "left"
        until = f" until {format_timestamp(change.expires_at)}" if change.expires_at and change.operation == "I" else ""
        return f"{at}  user {change.user_id} {verb} {change.segment}{until}, {change.reason}{by}"
    moved = []
    if change.buckets_entered:
        moved.append(f"buckets {change.buckets_entered[0]}–{change.buckets_entered[1] - 1} entered")
    if change.buckets_left:
        moved.append(f"buckets {change.buckets_left[0]}–{change.buckets_left[1] - 1} left")
    return (f"{at}  {change.segment} rollout {change.from_percent:g}% → {change.to_percent:g}% ({change.reason}"
            + (f"; {', '.join(moved)}" if moved else "") + f"){by}")
