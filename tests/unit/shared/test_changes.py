"""The membership-changes events: built from outbox rows, encoded as the contract says, read back."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from pydantic import ValidationError

from shared.changes import (
    ID_HEADER,
    KIND_HEADER,
    MembershipChange,
    RolloutChange,
    bucket_ranges,
    decode,
    describe,
    encode,
    entry_changes,
    from_outbox,
    record_of,
)
from shared.rollout import rollout_bucket

AT = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)


def outbox_row(**values):
    row = dict.fromkeys(("user_id", "operation", "source", "command_id", "expires_at", "from_percent",
                         "to_percent"))
    return {**row, "seq": 1, "written_at": AT, "executed_at": AT, **values}


def test_a_history_row_is_a_membership_event_keyed_by_user_with_the_contracts_fields():
    change = from_outbox(outbox_row(kind="membership", source_id=1042, user_id=1000, segment_slug="AVITO_VOICE",
                                    operation="I", source="manual", reason="manual", command_id="c-1"))
    key, value, headers = encode(change)
    assert key == b"1000"
    assert dict(headers) == {KIND_HEADER: b"membership", ID_HEADER: b"membership-1042"}
    assert orjson.loads(value) == {
        "event_id": "membership-1042", "kind": "membership", "user_id": 1000, "segment": "AVITO_VOICE",
        "operation": "I", "source": "manual", "reason": "manual", "executed_at": "2026-12-06T10:00:00.123Z",
        "expires_at": None, "command_id": "c-1"}
    assert decode(value) == change.model_copy(update={"executed_at": AT.replace(microsecond=123000)})


def test_a_rollout_event_names_the_bucket_range_that_moved_and_is_keyed_by_segment():
    raised = from_outbox(outbox_row(kind="rollout", source_id=7, segment_slug="AVITO_DISCOUNT_30",
                                    reason="percent_changed", command_id="c-7", from_percent=Decimal("10"),
                                    to_percent=Decimal("30")))
    key, value, headers = encode(raised)
    assert key == b"segment:AVITO_DISCOUNT_30" and dict(headers)[ID_HEADER] == b"rollout-7"
    body = orjson.loads(value)
    assert (body["from_percent"], body["to_percent"], body["buckets_entered"], body["buckets_left"]) == (
        10, 30, [1000, 3000], None)
    assert isinstance(decode(value), RolloutChange)


@pytest.mark.parametrize(("before", "after", "entered", "left"), [
    (0, 10, (0, 1000), None),
    (10, 30, (1000, 3000), None),
    (50, 0, None, (0, 5000)),
    (Decimal("12.34"), Decimal("12.30"), None, (1230, 1234)),
    (20, 20, None, None),
])
def test_bucket_ranges_are_half_open_and_follow_the_rollout_rule(before, after, entered, left):
    assert bucket_ranges(before, after) == (entered, left)


def test_a_reader_applies_the_bucket_rule_to_know_whether_a_user_moved():
    change = RolloutChange(event_id="rollout-1", segment="AVITO_VOICE_MESSAGES", from_percent=85, to_percent=86,
                           reason="percent_changed", buckets_entered=(8500, 8600), executed_at=AT)
    assert rollout_bucket("AVITO_VOICE_MESSAGES", 1000) == 8546  # the contract's test vector
    assert change.moves(8546) == "I" and change.moves(8600) is None and change.moves(8499) is None
    lowered = change.model_copy(update={"buckets_entered": None, "buckets_left": (8500, 8600)})
    assert lowered.moves(8546) == "D"


def test_events_read_in_words():
    exit_ = MembershipChange(event_id="membership-9", user_id=5, segment="TRIAL", operation="D", source="manual",
                             reason="ttl", executed_at=AT, expires_at=AT)
    assert describe(exit_) == "2026-12-06T10:00:00.123Z  user 5 left TRIAL, ttl"
    entry = exit_.model_copy(update={"operation": "I", "reason": "manual", "command_id": "c-2"})
    assert describe(entry) == "2026-12-06T10:00:00.123Z  user 5 entered TRIAL until 2026-12-06T10:00:00.123Z, " \
                              "manual (command c-2)"
    rollout = RolloutChange(event_id="rollout-1", segment="S", from_percent=10, to_percent=0.5,
                            reason="percent_changed", buckets_left=(50, 1000), executed_at=AT)
    assert describe(rollout) == "2026-12-06T10:00:00.123Z  S rollout 10% → 0.5% (percent_changed; buckets 50–999 left)"


def test_a_record_that_is_not_an_event_is_refused():
    with pytest.raises(ValidationError):
        decode(b'{"kind": "membership", "user_id": 1}')
    with pytest.raises(ValidationError):
        decode(b"not json")


def test_an_outbox_entry_holds_its_statements_changes_in_order_and_the_fast_encoding_equals_the_models():
    entry = {"seq": 5, "kinds": ["membership", "membership", "rollout"], "source_ids": [41, 42, 7],
             "user_ids": [1000, 1001, None], "segment_slugs": ["A", "A", "B"], "operations": ["I", "D", None],
             "executed_ats": [AT, AT, AT], "sources": ["manual", "manual", None],
             "reasons": ["manual", "ttl", "percent_changed"], "command_ids": ["c-1", None, "c-7"],
             "expires_ats": [AT, AT, None], "from_percents": [None, None, Decimal("12.5")],
             "to_percents": [None, None, Decimal(0)], "written_at": AT}
    changes = entry_changes(entry)
    assert [(c["kind"], c["source_id"], c["user_id"]) for c in changes] == [
        ("membership", 41, 1000), ("membership", 42, 1001), ("rollout", 7, None)]
    for change in changes:
        assert record_of(change) == encode(from_outbox(change))
