"""The membership rules of one user, applied in memory (CONTRACT: membership semantics).

A batch loads the state of its users once, applies every command to it in order here, and the
repository writes the difference in a few set-based statements. Nothing here touches I/O, so each
rule is unit-testable and each command stays atomic: a rejection is decided before any change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from shared.commands import CreateUser, UpdateUserSegments
from shared.outcomes import ErrorCode, Status, format_timestamp
from shared.rollout import rollout_bucket, rollout_threshold


@dataclass(frozen=True, slots=True)
class SegmentRef:
    id: int
    slug: str
    percent: Decimal
    threshold: int = field(init=False)  # rollout buckets below it are covered

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", rollout_threshold(self.percent))


class UserState:
    """One user's explicit memberships and exclusions, and which of them a batch changed."""

    __slots__ = ("changed_exclusions", "changed_explicit", "excluded", "explicit", "newly_registered",
                 "registered", "user_id")

    def __init__(self, user_id: int, registered: bool = False,
                 explicit: dict[int, datetime | None] | None = None, excluded: set[int] | None = None) -> None:
        self.user_id = user_id
        self.registered = registered
        self.explicit = explicit if explicit is not None else {}  # segment id → expires_at (None: permanent)
        self.excluded = excluded if excluded is not None else set()
        self.changed_explicit: set[int] = set()
        self.changed_exclusions: set[int] = set()
        self.newly_registered = False

    def covered(self, segment: SegmentRef) -> bool:
        return segment.threshold > 0 and rollout_bucket(segment.slug, self.user_id) < segment.threshold

    def is_member(self, segment: SegmentRef, now: datetime) -> bool:
        if segment.id in self.explicit:
            expires_at = self.explicit[segment.id]
            if expires_at is None or expires_at > now:
                return True
        return segment.id not in self.excluded and self.covered(segment)


class HistoryRow(NamedTuple):  # a tuple: built for every entry and exit, so cheap to make
    user_id: int
    segment_slug: str
    operation: str  # I entered, D left
    executed_at: datetime
    source: str
    reason: str
    command_id: str | None


@dataclass(slots=True)
class Decision:
    status: Status
    result: dict | None = None
    error_code: str | None = None
    error_message: str | None = None
    history: list[HistoryRow] = field(default_factory=list)


def register(state: UserState, now: datetime) -> bool:
    """Any command naming a user registers it; returns whether it is new."""
    if state.registered:
        return False
    state.registered = state.newly_registered = True
    return True


def apply_create_user(command: CreateUser, state: UserState, _segments: dict[str, SegmentRef],
                      now: datetime, command_id: str) -> Decision:
    created = register(state, now)
    return Decision(Status.APPLIED, result={"user_id": state.user_id, "created": created})


def _reap_expired(state: UserState, segment: SegmentRef, now: datetime, history: list[HistoryRow]) -> None:
    """An explicit membership past its expiry ended then, whether or not the worker has run."""
    expires_at = state.explicit.get(segment.id, None)
    if segment.id in state.explicit and expires_at is not None and expires_at <= now:
        del state.explicit[segment.id]
        state.changed_explicit.add(segment.id)
        if not state.is_member(segment, expires_at):
            history.append(HistoryRow(state.user_id, segment.slug, "D", expires_at, "manual", "ttl", None))


def apply_update_user_segments(command: UpdateUserSegments, state: UserState,
                               segments: dict[str, SegmentRef], now: datetime, command_id: str) -> Decision:
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

    register(state, now)
    expires_at = command.expiry_from(now)
    history: list[HistoryRow] = []
    added, removed, unchanged = [], [], []
    for slug in add:
        segment = segments[slug]
        _reap_expired(state, segment, now, history)
        was_member = state.is_member(segment, now)
        state.explicit[segment.id] = expires_at
        state.changed_explicit.add(segment.id)
        if segment.id in state.excluded:
            state.excluded.discard(segment.id)
            state.changed_exclusions.add(segment.id)
        if not was_member:
            history.append(HistoryRow(state.user_id, slug, "I", now, "manual", "manual", command_id))
        added.append(slug)
    for slug in remove:
        segment = segments.get(slug)
        if segment is None:
            unchanged.append(slug)
            continue
        _reap_expired(state, segment, now, history)
        was_member = state.is_member(segment, now)
        if segment.id in state.explicit:
            del state.explicit[segment.id]
            state.changed_explicit.add(segment.id)
        if state.covered(segment) and segment.id not in state.excluded:
            state.excluded.add(segment.id)
            state.changed_exclusions.add(segment.id)
        if was_member:
            history.append(HistoryRow(state.user_id, slug, "D", now, "manual", "manual", command_id))
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
