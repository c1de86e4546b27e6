"""The membership rule (shared/membership.py), once, for every service that asks it."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from shared.membership import (
    ExplicitSpan,
    HistoryRow,
    Segment,
    UserChanges,
    UserSegment,
    UserState,
    covers,
    is_member,
    leaves_at_expiry,
    rollout_move,
    user_segments,
)
from tests.buckets import user_in_buckets

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
VOICE = Segment(1, "AVITO_VOICE_MESSAGES", Decimal(0))


def test_coverage_follows_the_contract_vectors():
    # "AVITO_VOICE_MESSAGES:1002" is bucket 12: covered from 0.13 %, not at 0.12 %
    assert covers(Segment(1, "AVITO_VOICE_MESSAGES", Decimal("0.13")), 1002)
    assert not covers(Segment(1, "AVITO_VOICE_MESSAGES", Decimal("0.12")), 1002)
    assert not covers(Segment(1, "AVITO_VOICE_MESSAGES", Decimal(0)), 1002)
    assert covers(Segment(1, "AVITO_VOICE_MESSAGES", Decimal(100)), 1000)  # bucket 8546


def test_member_when_explicit_or_covered_and_not_excluded():
    half = Segment(2, "HALF", Decimal(50))
    inside = user_in_buckets("HALF", 0, 5000)
    outside = user_in_buckets("HALF", 5000, 10_000)
    assert is_member(half, inside, explicit=False, excluded=False)
    assert not is_member(half, inside, explicit=False, excluded=True)  # removed explicitly
    assert not is_member(half, outside, explicit=False, excluded=False)
    assert is_member(half, outside, explicit=True, excluded=False)
    assert is_member(VOICE, 1000, explicit=True, excluded=False)
    assert not is_member(VOICE, 1000, explicit=False, excluded=False)


def test_an_expiry_is_an_exit_only_when_the_rollout_does_not_cover_the_user():
    half = Segment(2, "HALF", Decimal(50))
    assert not leaves_at_expiry(half, user_in_buckets("HALF", 0, 5000))
    assert leaves_at_expiry(half, user_in_buckets("HALF", 5000, 10_000))
    assert leaves_at_expiry(VOICE, 1000)


def test_a_rollout_change_moves_only_the_users_between_its_thresholds():
    mover = user_in_buckets("S", 1000, 3000)
    assert rollout_move("S", mover, 0, 3000) == "I"
    assert rollout_move("S", mover, 3000, 1000) == "D"
    assert rollout_move("S", mover, 3000, 5000) is None  # in before and after
    assert rollout_move("S", mover, 0, 1000) is None  # out before and after


def test_a_users_segments_explicit_first_then_the_rollout_sorted_by_slug():
    everyone = Segment(3, "EVERYONE", Decimal(100))
    nobody = Segment(4, "NOBODY", Decimal(0))
    also_explicit = Segment(5, "ALSO_EXPLICIT", Decimal(100))
    expiry = NOW + timedelta(days=1)
    got = user_segments(1000, {"B_EXPLICIT": expiry, "ALSO_EXPLICIT": None}, excluded=set(),
                        rollout=[everyone, nobody, also_explicit])
    assert got == [UserSegment("ALSO_EXPLICIT", "manual", None), UserSegment("B_EXPLICIT", "manual", expiry),
                   UserSegment("EVERYONE", "auto", None)]
    assert user_segments(1000, {}, excluded={"EVERYONE"}, rollout=[everyone]) == []


def test_user_state_reports_exactly_what_changed():
    state = UserState(7, registered=True, explicit={1: None, 2: NOW}, excluded={3})
    state.set_explicit(4, None)
    state.drop_explicit(1)
    state.drop_explicit(99)  # not there: no change
    state.exclude(5)
    state.exclude(3)  # already excluded: no change
    state.lift_exclusion(3)
    assert state.changes(NOW) == UserChanges(upserts=[(7, 4, None)], deletions=[(7, 1)],
                                          new_exclusions=[(7, 5)], lifted_exclusions=[(7, 3)])
    assert UserState(8).changes(NOW) == UserChanges()


def test_stored_rows_replaced_or_deleted_end_their_spans():
    since, expiry = NOW - timedelta(days=2), NOW - timedelta(hours=1)
    state = UserState(7)
    state.load_explicit(1, None, since)     # deleted now
    state.load_explicit(2, expiry, since)   # expired before it is replaced: ends at its expiry
    state.load_explicit(3, None, since)     # kept as it is: no span
    state.load_exclusion(4, since)          # lifted now
    state.load_exclusion(5, since)          # kept
    state.drop_explicit(1)
    state.set_explicit(2, None)
    state.lift_exclusion(4)
    state.set_explicit(6, None)             # new: nothing stored, no span
    assert sorted(state.changes(NOW).ended_spans) == [ExplicitSpan(7, 1, since, NOW), ExplicitSpan(7, 2, since, expiry),
                                                      ExplicitSpan(7, 4, since, NOW)]


def test_an_expired_membership_is_reaped_at_its_expiry():
    expired_at = NOW - timedelta(minutes=5)
    state = UserState(7, explicit={VOICE.id: expired_at})
    assert not state.is_member(VOICE, NOW)
    assert state.reap_expired(VOICE, NOW) == HistoryRow(7, VOICE.slug, "D", expired_at, "manual", "ttl", None,
                                                        expired_at)
    assert state.changes(NOW).deletions == [(7, VOICE.id)]
    covered = user_in_buckets("HALF", 0, 5000)
    half = Segment(2, "HALF", Decimal(50))
    still_in = UserState(covered, explicit={half.id: expired_at})
    assert still_in.reap_expired(half, NOW) is None  # the rollout keeps it in: no exit
    assert UserState(7, explicit={VOICE.id: NOW + timedelta(1)}).reap_expired(VOICE, NOW) is None
