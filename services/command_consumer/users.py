"""Handlers of the user commands, applied in memory to the batch's UserStates.

A batch loads the state of its users once, applies every command to it in order here, and the
repository writes what changed in a few set-based statements. Nothing here does I/O, so each
command stays atomic: a rejection is decided before any change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from shared.commands import CreateUser, UpdateUserSegments
from shared.membership import HistoryRow, Segment, UserState
from shared.outcomes import ErrorCode, Status, format_timestamp


@dataclass(slots=True)
class Decision:
    """What a handler decided about one command: its status, result or error, and history."""

    status: Status
    result: dict | None = None
    error_code: str | None = None
    error_message: str | None = None
    history: list[HistoryRow] = field(default_factory=list)
    # A deleted segment (id, slug) whose members are removed in chunks after the batch: the
    # outcome comes with the last chunk (services/command_consumer/removals.py).
    removal: tuple[int, str] | None = None
    at: datetime | None = None  # when it was applied, if the handler read the clock itself


def apply_create_user(command: CreateUser, state: UserState, _segments: dict[str, Segment],
                      now: datetime, command_id: str) -> Decision:
    return Decision(Status.APPLIED, result={"user_id": state.user_id, "created": state.register()})


def apply_update_user_segments(command: UpdateUserSegments, state: UserState,
                               segments: dict[str, Segment], now: datetime, command_id: str) -> Decision:
    add = list(dict.fromkeys(command.add))
    remove = list(dict.fromkeys(command.remove))
    conflicting = sorted(set(add) & set(remove))
    if conflicting:
        return Decision(Status.REJECTED, error_code=ErrorCode.CONFLICTING_SEGMENTS,
                        error_message=f"segments both added and removed: {', '.join(conflicting)}")
    missing = [slug for slug in add if slug not in segments]
    if missing:
        return Decision(Status.REJECTED, error_code=ErrorCode.SEGMENT_NOT_FOUND,
                        error_message=f"no live segment: {', '.join(missing)}")

    state.register()
    expires_at = command.expiry_from(now)
    history: list[HistoryRow] = []
    added, removed, unchanged = [], [], []
    for slug in add:
        segment = segments[slug]
        if expired := state.reap_expired(segment, now):
            history.append(expired)
        was_member = state.is_member(segment, now)
        state.set_explicit(segment.id, expires_at)
        state.lift_exclusion(segment.id)
        if not was_member:
            history.append(HistoryRow(state.user_id, slug, "I", now, "manual", "manual", command_id, expires_at))
        added.append(slug)
    for slug in remove:
        segment = segments.get(slug)
        if segment is None:
            unchanged.append(slug)
            continue
        if expired := state.reap_expired(segment, now):
            history.append(expired)
        was_member = state.is_member(segment, now)
        had_expiry = state.explicit.get(segment.id)
        state.drop_explicit(segment.id)
        if state.covered(segment):
            state.exclude(segment.id)
        if was_member:
            history.append(HistoryRow(state.user_id, slug, "D", now, "manual", "manual", command_id, had_expiry))
            removed.append(slug)
        else:
            unchanged.append(slug)
    result = {
        "added": added,
        "removed": removed,
        "unchanged": unchanged,
        "expires_at": format_timestamp(expires_at) if expires_at and added else None,
    }
    return Decision(Status.APPLIED, result=result, history=history)


USER_HANDLERS = {
    CreateUser: apply_create_user,
    UpdateUserSegments: apply_update_user_segments,
}
