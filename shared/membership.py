"""The membership rule, in one place (README: "The contract, in short", Membership).

A user is in a segment when it holds an explicit membership that has not expired, or when the
segment's percent rollout covers it and it was not explicitly removed. Every service asks here:
the consumer when it applies a command, the query API when it answers a read or expands a
rollout event in a report, the expiry worker when it decides whether an expiry is an exit.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from shared.rollout import rollout_bucket, rollout_threshold


def unexpired(alias: str = "m", at: str = "now()") -> str:
    """"This explicit membership has not expired" as SQL, for the memberships row `alias` at the
    moment `at`: every read applies it itself, never relying on the expiry worker having run."""
    return f"({alias}.expires_at IS NULL OR {alias}.expires_at > {at})"


@dataclass(frozen=True, slots=True)
class Segment:
    """A live segment as the rule needs it: its id, slug and rollout percent."""

    id: int
    slug: str
    percent: Decimal
    threshold: int = field(init=False)  # rollout buckets below it are covered

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", rollout_threshold(self.percent))


def covers(segment: Segment, user_id: int) -> bool:
    """Whether the segment's percent rollout covers the user (deterministic, no per-user row)."""
    return segment.threshold > 0 and rollout_bucket(segment.slug, user_id) < segment.threshold


def is_member(segment: Segment, user_id: int, *, explicit: bool, excluded: bool) -> bool:
    """`explicit`: the user holds an explicit membership that has not expired."""
    return explicit or (not excluded and covers(segment, user_id))


def rollout_move(slug: str, user_id: int, before: int, after: int) -> str | None:
    """The history operation a change of the rollout threshold from `before` to `after` means for
    a user with no explicit membership or exclusion: "I", "D", or None when it does not move."""
    bucket = rollout_bucket(slug, user_id)
    covered_before, covered_after = bucket < before, bucket < after
    if covered_before == covered_after:
        return None
    return "I" if covered_after else "D"


class UserSegment(NamedTuple):
    slug: str
    source: str  # manual: an explicit membership; auto: the rollout
    expires_at: datetime | None


def user_segments(user_id: int, explicit: Mapping[str, datetime | None], excluded: Container[str],
                  rollout: Iterable[Segment]) -> list[UserSegment]:
    """The segments a user is in, sorted by slug. `explicit` maps the slugs of its unexpired
    explicit memberships to their expiry; `rollout` is every live segment with a percent."""
    segments = {slug: UserSegment(slug, "manual", expires_at) for slug, expires_at in explicit.items()}
    for segment in rollout:  # one hash per rollout segment
        if segment.slug not in segments and is_member(segment, user_id, explicit=False,
                                                      excluded=segment.slug in excluded):
            segments[segment.slug] = UserSegment(segment.slug, "auto", None)
    return [segments[slug] for slug in sorted(segments)]


def leaves_at_expiry(segment: Segment, user_id: int) -> bool:
    """Whether the end of an explicit membership is an exit. An explicit membership and an
    exclusion never coexist, so what is left is the rollout alone."""
    return not is_member(segment, user_id, explicit=False, excluded=False)


class HistoryRow(NamedTuple):  # a tuple: built for every entry and exit, so cheap to make
    user_id: int
    segment_slug: str
    operation: str  # I entered, D left
    executed_at: datetime
    source: str
    reason: str
    command_id: str | None
    expires_at: datetime | None = None  # the membership's expiry at the change (the event carries it)


HISTORY_COLUMNS = HistoryRow._fields  # the columns of membership_history that rows are copied into


class UserState:
    """One user's explicit memberships and exclusions, and the changes made to them since it was
    loaded, so that writing it back needs no bookkeeping by the code that changed it."""

    __slots__ = ("_changed_exclusions", "_changed_explicit", "_stored", "_stored_exclusions", "excluded", "explicit",
                 "newly_registered", "registered", "user_id")

    def __init__(self, user_id: int, registered: bool = False,
                 explicit: dict[int, datetime | None] | None = None, excluded: set[int] | None = None) -> None:
        self.user_id = user_id
        self.registered = registered
        self.explicit = explicit if explicit is not None else {}  # segment id → expires_at (None: permanent)
        self.excluded = excluded if excluded is not None else set()
        self.newly_registered = False
        self._changed_explicit: set[int] = set()
        self._changed_exclusions: set[int] = set()
        # The stored rows as loaded: segment id → (since, expires_at) of a membership, → since of an
        # exclusion. A row replaced or deleted ends a span of it (ExplicitSpan).
        self._stored: dict[int, tuple[datetime, datetime | None]] = {}
        self._stored_exclusions: dict[int, datetime] = {}

    def load_explicit(self, segment_id: int, expires_at: datetime | None, since: datetime) -> None:
        """A stored membership, held since `since` (its added_at)."""
        self.explicit[segment_id] = expires_at
        self._stored[segment_id] = (since, expires_at)

    def load_exclusion(self, segment_id: int, since: datetime) -> None:
        self.excluded.add(segment_id)
        self._stored_exclusions[segment_id] = since

    def register(self) -> bool:
        """Any command naming a user registers it; returns whether it is new."""
        if self.registered:
            return False
        self.registered = self.newly_registered = True
        return True

    def covered(self, segment: Segment) -> bool:
        return covers(segment, self.user_id)

    def is_member(self, segment: Segment, now: datetime) -> bool:
        explicit = segment.id in self.explicit and (self.explicit[segment.id] is None
                                                     or self.explicit[segment.id] > now)
        return is_member(segment, self.user_id, explicit=explicit, excluded=segment.id in self.excluded)

    def set_explicit(self, segment_id: int, expires_at: datetime | None) -> None:
        self.explicit[segment_id] = expires_at
        self._changed_explicit.add(segment_id)

    def drop_explicit(self, segment_id: int) -> None:
        if segment_id in self.explicit:
            del self.explicit[segment_id]
            self._changed_explicit.add(segment_id)

    def exclude(self, segment_id: int) -> None:
        if segment_id not in self.excluded:
            self.excluded.add(segment_id)
            self._changed_exclusions.add(segment_id)

    def lift_exclusion(self, segment_id: int) -> None:
        if segment_id in self.excluded:
            self.excluded.discard(segment_id)
            self._changed_exclusions.add(segment_id)

    def reap_expired(self, segment: Segment, now: datetime) -> HistoryRow | None:
        """An explicit membership past its expiry ended then, whether or not the worker has run;
        returns the exit, when the user is not still in by the rollout."""
        expires_at = self.explicit.get(segment.id)
        if expires_at is None or expires_at > now:
            return None
        self.drop_explicit(segment.id)
        if self.is_member(segment, expires_at):
            return None
        return HistoryRow(self.user_id, segment.slug, "D", expires_at, "manual", "ttl", None, expires_at)

    def changes(self, now: datetime, into: UserChanges | None = None) -> UserChanges:
        """What changed since the state was loaded, as the rows to write (added to `into`), `now`
        being when they are written: a stored row that is replaced or deleted ends its span then,
        or at its expiry if that came first. (An upsert restarts a membership's added_at, so the
        row it replaces ends its span too.)"""
        changes = UserChanges() if into is None else into
        for segment_id in self._changed_explicit:
            if segment_id in self.explicit:
                changes.upserts.append((self.user_id, segment_id, self.explicit[segment_id]))
            else:
                changes.deletions.append((self.user_id, segment_id))
            if segment_id in self._stored:
                since, expires_at = self._stored[segment_id]
                ended = now if expires_at is None else min(expires_at, now)
                changes.ended_spans.append(ExplicitSpan(self.user_id, segment_id, since, ended))
        for segment_id in self._changed_exclusions:
            if segment_id in self.excluded:
                changes.new_exclusions.append((self.user_id, segment_id))
                continue
            changes.lifted_exclusions.append((self.user_id, segment_id))
            if segment_id in self._stored_exclusions:
                changes.ended_spans.append(ExplicitSpan(self.user_id, segment_id,
                                                        self._stored_exclusions[segment_id], now))
        return changes


class ExplicitSpan(NamedTuple):
    """A time during which a user held an explicit membership or an exclusion for a segment, from
    `since` until just before `ended`: a rollout event at a moment in it did not move the user.
    Live rows carry their own start; a row that ends is kept as a span (explicit_spans) when the
    segment had a rollout event since it started, so that reports can tell whom each event moved
    without the event copying every explicit row of its segment."""

    user_id: int
    segment_id: int
    since: datetime
    ended: datetime


@dataclass(slots=True)
class UserChanges:
    upserts: list[tuple[int, int, datetime | None]] = field(default_factory=list)  # user, segment, expires_at
    deletions: list[tuple[int, int]] = field(default_factory=list)
    new_exclusions: list[tuple[int, int]] = field(default_factory=list)
    lifted_exclusions: list[tuple[int, int]] = field(default_factory=list)
    ended_spans: list[ExplicitSpan] = field(default_factory=list)
