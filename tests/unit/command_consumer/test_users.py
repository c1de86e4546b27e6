"""The user-command handlers, applied in memory without a database."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.command_consumer.users import apply_update_user_segments
from shared.commands import UpdateUserSegments
from shared.membership import Segment, UserChanges, UserState
from tests.buckets import user_in_buckets

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
VOICE = Segment(1, "AVITO_VOICE_MESSAGES", Decimal(0))
DISCOUNT = Segment(2, "AVITO_DISCOUNT_30", Decimal(0))
SEGMENTS = {s.slug: s for s in (VOICE, DISCOUNT)}


def update(**fields) -> UpdateUserSegments:
    return UpdateUserSegments(type="update_user_segments", user_id=1000, **fields)


def test_add_then_remove_records_entry_and_exit():
    state = UserState(1000, registered=True)
    added = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES"]), state, SEGMENTS, NOW, "c1")
    assert added.result["added"] == ["AVITO_VOICE_MESSAGES"]
    assert [(h.operation, h.reason) for h in added.history] == [("I", "manual")]
    removed = apply_update_user_segments(update(remove=["AVITO_VOICE_MESSAGES", "AVITO_DISCOUNT_30", "GONE"]),
                                         state, SEGMENTS, NOW, "c2")
    assert removed.result["removed"] == ["AVITO_VOICE_MESSAGES"]
    assert removed.result["unchanged"] == ["AVITO_DISCOUNT_30", "GONE"]
    assert [(h.operation, h.reason) for h in removed.history] == [("D", "manual")]
    assert state.explicit == {}


def test_rejections_change_nothing():
    state = UserState(1000)
    conflict = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES"], remove=["AVITO_VOICE_MESSAGES"]),
                                          state, SEGMENTS, NOW, "c1")
    assert conflict.error_code == "conflicting_segments"
    missing = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES", "NOPE", "NADA"]), state, SEGMENTS,
                                         NOW, "c2")
    assert missing.error_code == "segment_not_found"
    assert "NOPE" in missing.error_message and "NADA" in missing.error_message
    assert state.explicit == {} and not state.registered and state.changes(NOW) == UserChanges()


def test_re_adding_replaces_the_expiry_without_a_new_entry():
    state = UserState(1000)
    first = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES"], ttl_seconds=60), state, SEGMENTS,
                                       NOW, "c1")
    assert state.explicit[VOICE.id] == NOW + timedelta(seconds=60)
    assert len(first.history) == 1
    again = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES"]), state, SEGMENTS, NOW, "c2")
    assert state.explicit[VOICE.id] is None  # no TTL given: permanent from now on
    assert again.history == []


def test_an_expired_membership_left_at_its_expiry():
    expired_at = NOW - timedelta(minutes=5)
    state = UserState(1000, registered=True, explicit={VOICE.id: expired_at})
    decision = apply_update_user_segments(update(add=["AVITO_VOICE_MESSAGES"]), state, SEGMENTS, NOW, "c1")
    assert [(h.operation, h.executed_at, h.reason) for h in decision.history] == [
        ("D", expired_at, "ttl"), ("I", NOW, "manual")]


def test_removing_a_covered_user_excludes_it_until_an_explicit_add():
    rollout = Segment(3, "ROLLOUT", Decimal(50))
    user_id = user_in_buckets("ROLLOUT", 0, 5000)
    state = UserState(user_id, registered=True)
    assert state.is_member(rollout, NOW)
    command = UpdateUserSegments(type="update_user_segments", user_id=user_id, remove=["ROLLOUT"])
    removed = apply_update_user_segments(command, state, {"ROLLOUT": rollout}, NOW, "c1")
    assert removed.result["removed"] == ["ROLLOUT"] and rollout.id in state.excluded
    assert not state.is_member(rollout, NOW)
    command = UpdateUserSegments(type="update_user_segments", user_id=user_id, add=["ROLLOUT"])
    added = apply_update_user_segments(command, state, {"ROLLOUT": rollout}, NOW, "c2")
    assert rollout.id not in state.excluded and state.is_member(rollout, NOW)
    assert [h.operation for h in added.history] == ["I"]
