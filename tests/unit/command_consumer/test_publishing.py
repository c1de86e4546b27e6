"""The consumer's pure pieces, without Kafka: the poison guard, the outcome and DLQ records, the
outcome row and its contract JSON, the partition lease keys."""

from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import TopicPartition

from services.command_consumer.batch import Processed
from services.command_consumer.leases import lease_key
from services.command_consumer.parsing import InvalidRecord, RecordRef, ValidCommand
from services.command_consumer.poison_guard import PoisonGuard, PoisonGuardTripped
from services.command_consumer.publishing import dlq_message, outcome_message, without_value
from shared.commands import CreateUser
from shared.outcomes import ErrorCode, Outcome, OutcomeRow

AT = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
LEASE_KEY_0 = -4230496917917308163


def record(offset: int, value: bytes = b"{}", headers=()) -> RecordRef:
    return RecordRef("assignments.commands", 3, offset, b"1000", value, tuple(headers), 1_700_000_000_000)


def invalid(offset: int) -> InvalidRecord:
    return InvalidRecord(record(offset, b"not json"), f"assignments.commands:3:{offset}", None,
                         ErrorCode.INVALID_JSON, "not valid UTF-8 JSON: unexpected character")


def valid(offset: int) -> ValidCommand:
    return ValidCommand(record(offset), f"c{offset}", CreateUser(type="create_user", user_id=1000))


def test_the_guard_trips_only_on_a_full_window_mostly_invalid():
    guard = PoisonGuard(window=10, max_invalid_share=0.9)
    guard.check([invalid(i) for i in range(9)])  # 9 of 9 invalid, but the window is not full yet
    guard.check([valid(9), valid(10)])  # full: 8 of the last 10 invalid
    guard.check([invalid(i) for i in range(11, 19)])  # still 8 of the last 10
    with pytest.raises(PoisonGuardTripped, match=r"90% of the last 10 records are invalid"):
        guard.check([invalid(19)])  # 9 of the last 10: at the limit


def test_the_guard_lets_a_mostly_valid_stream_through():
    guard = PoisonGuard(window=10, max_invalid_share=0.9)
    for offset in range(100):
        guard.check([invalid(offset) if offset % 3 == 0 else valid(offset)])


def test_an_outcome_row_is_the_table_row_and_gives_the_contract_json():
    row = OutcomeRow("c-1", "create_user", "applied", None, {"user_id": 1000, "created": True}, AT,
                     "assignments.commands", 3, 1042, "checkout")
    assert OutcomeRow.from_record(row._asdict()) == row
    contract = row.contract("0/16B3748")
    assert contract == {"command_id": "c-1", "type": "create_user", "status": "applied", "error": None,
                        "result": {"user_id": 1000, "created": True}, "processed_at": "2026-11-28T10:00:00.123Z",
                        "source": {"topic": "assignments.commands", "partition": 3, "offset": 1042},
                        "actor": "checkout", "consistency_token": "0/16B3748"}
    Outcome.model_validate(contract)  # the documented schema accepts it


def test_an_outcome_record_is_keyed_by_command_id_with_the_contract_headers_and_the_trace():
    parsed = ValidCommand(record(7, headers=[("traceparent", b"00-abc-def-01")]), "c-7",
                          CreateUser(type="create_user", user_id=1000))
    row = OutcomeRow("c-7", "create_user", "applied", None, None, AT, "assignments.commands", 3, 7)
    message = outcome_message(Processed(parsed, row, replayed=False))
    assert message.key == b"c-7"
    assert orjson.loads(message.value) == row.contract()
    assert orjson.loads(outcome_message(Processed(parsed, row, replayed=False), "1/A").value)[
        "consistency_token"] == "1/A"
    assert message.headers == [("command-id", b"c-7"), ("command-type", b"create_user"), ("status", b"applied"),
                               ("traceparent", b"00-abc-def-01")]
    untraced = outcome_message(Processed(valid(8), row, replayed=True))
    assert [name for name, _ in untraced.headers] == ["command-id", "command-type", "status"]


def test_a_dead_letter_keeps_the_original_bytes_and_says_why_and_where_from():
    bad = invalid(42)
    message = dlq_message(bad)
    assert (message.key, message.value) == (b"1000", b"not json")
    assert dict(message.headers) == {
        "x-error-code": b"invalid_json", "x-error-message": b"not valid UTF-8 JSON: unexpected character",
        "x-original-topic": b"assignments.commands", "x-original-partition": b"3", "x-original-offset": b"42",
        "x-command-id": b"assignments.commands:3:42"}
    stripped = without_value(message)
    assert stripped.value is None and stripped.key == b"1000"
    assert stripped.headers == [*message.headers, ("x-original-value-bytes", b"8")]


def test_a_long_reason_is_cut_to_fit_a_header():
    long = InvalidRecord(record(1), "x", None, ErrorCode.INVALID_FIELD, "é" * 5000)
    assert len(dict(dlq_message(long).headers)["x-error-message"]) == 4000


def test_partition_lease_keys_are_distinct_and_stable():
    """A lease key is the same in every process and version (a standby of the next release must
    wait for this one's locks), and distinct for every partition of every group."""
    groups = ("segments-command-consumer", "another-deployment")
    topics = ("segments.commands", "assignments.commands")
    keys = {lease_key(group, TopicPartition(topic, partition))
            for group in groups for topic in topics for partition in range(256)}
    assert len(keys) == len(groups) * len(topics) * 256
    assert all(-2**63 <= key < 2**63 for key in keys)  # PostgreSQL's bigint
    # Computed once when leases were introduced; changing the derivation breaks rolling upgrades.
    assert lease_key("segments-command-consumer", TopicPartition("assignments.commands", 0)) == LEASE_KEY_0
