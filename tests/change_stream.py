"""The membership-changes topic compared with what PostgreSQL recorded: the check of the fault
tests, kept apart so that its own tests can show it catches an invented, a missing, a wrong or a
misordered event."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from shared.changes import MembershipChange, RolloutChange, decode


def milliseconds(moment: datetime | None) -> datetime | None:
    """A time as events carry it (the contract's format has milliseconds)."""
    return moment and moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def expected_membership(row: Mapping[str, Any]) -> tuple:
    return (row["user_id"], row["segment_slug"], row["operation"], row["source"], row["reason"],
            milliseconds(row["executed_at"]), row["command_id"], milliseconds(row["expires_at"]))


def published_membership(event: MembershipChange) -> tuple:
    return (event.user_id, event.segment, event.operation, event.source, event.reason, event.executed_at,
            event.command_id, event.expires_at)


def problems(values: Iterable[bytes], history: Iterable[Mapping[str, Any]],
             rollouts: Iterable[Mapping[str, Any]]) -> list[str]:
    """Everything that makes the topic differ from the history: `values` are the topic's record
    values, each partition's in offset order (so each key's in the order published). Empty when:
    each history row and each rollout event is exactly one event id, with its fields; no event
    without a row; a copy of an event identical to it; and in first-publication order, a
    membership's changes and a user's changes by its own commands in commit (row id) order, and a
    segment's rollout changes likewise."""
    found: list[str] = []
    rows = {f"membership-{row['id']}": row for row in history}
    rollout_rows = {f"rollout-{row['id']}": row for row in rollouts}
    first: dict[str, bytes] = {}
    order: dict[tuple, list[int]] = {}
    for value in values:
        try:
            event = decode(value)
        except ValidationError as error:
            found.append(f"not an event: {value[:80]!r} ({error.error_count()} errors)")
            continue
        if event.event_id in first:
            if first[event.event_id] != value:
                found.append(f"{event.event_id} published twice with different content")
            continue
        first[event.event_id] = value
        row_id = int(event.event_id.rsplit("-", 1)[1])
        if isinstance(event, MembershipChange):
            row = rows.get(event.event_id)
            if row is None:
                found.append(f"{event.event_id}: published, but no such history row (invented)")
                continue
            if published_membership(event) != expected_membership(row):
                found.append(f"{event.event_id}: {published_membership(event)} != {expected_membership(row)}")
            order.setdefault(("membership", event.user_id, event.segment), []).append(row_id)
            if event.reason == "manual":  # the user's own commands: applied one transaction after another
                order.setdefault(("user", event.user_id), []).append(row_id)
        elif isinstance(event, RolloutChange):
            row = rollout_rows.get(event.event_id)
            if row is None:
                found.append(f"{event.event_id}: published, but no such rollout event (invented)")
                continue
            if (event.segment, event.from_percent, event.to_percent, event.reason, event.command_id) != (
                    row["segment_slug"], float(row["old_percent"]), float(row["new_percent"]), row["reason"],
                    row["command_id"]):
                found.append(f"{event.event_id}: does not match its rollout event")
            order.setdefault(("rollout", event.segment), []).append(row_id)
    missing = sorted((set(rows) | set(rollout_rows)) - set(first), key=lambda name: (name[0], len(name), name))
    if missing:
        found.append(f"{len(missing)} changes never published, e.g. {missing[:5]}")
    for key, ids in order.items():
        if ids != sorted(ids):
            found.append(f"{key}: published out of commit order: {ids}")
    return found
