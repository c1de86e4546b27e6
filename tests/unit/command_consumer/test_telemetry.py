"""MetricsObserver: what a published batch adds to the consumer's metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from services.command_consumer.batch import Processed
from services.command_consumer.observers import BatchResult
from services.command_consumer.parsing import InvalidRecord, RecordRef, ValidCommand
from services.command_consumer.telemetry import MetricsObserver
from shared.commands import CreateUser
from shared.outcomes import ErrorCode, OutcomeRow

AT = datetime(2026, 12, 6, tzinfo=UTC)
TOPIC = "t-telemetry"


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def result() -> BatchResult:
    record = RecordRef(TOPIC, 2, 41, b"1", b"{}", (), 1_700_000_000_000)
    applied = Processed(ValidCommand(record, "c1", CreateUser(type="create_user", user_id=1)),
                        OutcomeRow("c1", "create_user", "applied", None, {}, AT, TOPIC, 2, 41), False)
    bad = RecordRef(TOPIC, 2, 42, b"1", b"x", (), 1_700_000_000_000)
    dead = Processed(InvalidRecord(bad, "c2", None, ErrorCode.INVALID_JSON, "not JSON"),
                     OutcomeRow("c2", None, "invalid", {"code": "invalid_json", "message": "not JSON"}, None, AT,
                                TOPIC, 2, 42), False)
    again = Processed(applied.parsed, applied.outcome, True)
    return BatchResult({TopicPartition(TOPIC, 2): [bad, bad]}, [applied, dead, again], "0/1", 0.01,
                       1_700_000_000.5, 1_700_000_000.6)


def test_a_published_batch_counts_its_commands_dead_letters_replays_and_lag():
    before = {"applied": value("segmentation_commands_total", type="create_user", status="applied"),
              "dlq": value("segmentation_dlq_records_total", code="invalid_json"),
              "replayed": value("segmentation_commands_replayed_total")}
    MetricsObserver(lambda tp: 50).published(result())
    assert value("segmentation_commands_total", type="create_user", status="applied") == before["applied"] + 1
    assert value("segmentation_dlq_records_total", code="invalid_json") == before["dlq"] + 1
    assert value("segmentation_commands_replayed_total") == before["replayed"] + 1
    assert value("segmentation_consumer_lag", topic=TOPIC, partition="2") == 50 - 43


def test_retries_are_counted():
    before = value("segmentation_consumer_db_retries_total")
    MetricsObserver(lambda tp: None).retrying({f"{TOPIC}:2": 41}, 1, ConnectionRefusedError())
    assert value("segmentation_consumer_db_retries_total") == before + 1


def test_a_partition_falls_behind_while_its_batch_waits_and_catches_up_when_published():
    from services.command_consumer.telemetry import TimeBehind

    behind, tp = TimeBehind(), TopicPartition(TOPIC, 5)
    behind.fetched(tp, 100, 1_700_000_000_000)
    behind.fetched(tp, 110, 1_700_000_030_000)  # the next batch, fetched while the first waits
    behind.report(now=1_700_000_090.0)
    assert value("segmentation_consumer_time_behind_seconds", topic=TOPIC, partition="5") == 90
    behind.published(tp, 109)  # the first batch's outcomes are out
    behind.report(now=1_700_000_090.0)
    assert value("segmentation_consumer_time_behind_seconds", topic=TOPIC, partition="5") == 60
    behind.published(tp, 120)
    behind.report(now=1_700_000_090.0)
    assert value("segmentation_consumer_time_behind_seconds", topic=TOPIC, partition="5") == 0


def test_publishing_records_when_the_consumer_last_made_progress():
    MetricsObserver(lambda tp: None).published(result())
    assert value("segmentation_consumer_last_progress_timestamp_seconds") == 1_700_000_000.6


def test_every_dead_letter_reason_is_counted_from_zero():
    """A series born at 1 shows no increase, so the first dead letter after a start would not alert."""
    for code in ("invalid_json", "not_an_object", "unknown_type", "wrong_topic", "invalid_field", "too_large"):
        assert REGISTRY.get_sample_value("segmentation_dlq_records_total", {"code": code}) is not None, code
