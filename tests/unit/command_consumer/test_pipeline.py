"""The batch pipeline without Kafka or PostgreSQL: the order in which a batch is applied, watched,
published and its offsets handed over; a partition's publishes in order; a shared batch that
meets a row lock splitting; a failed publish holding back the partition's next batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections import namedtuple
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from aiokafka import TopicPartition

from services.command_consumer.batch import Processed
from services.command_consumer.observers import BatchResult
from services.command_consumer.pipeline import BatchPipeline, SharedBatchBlocked
from shared.outcomes import OutcomeRow
from shared.settings import ConsumerSettings, KafkaSettings

Record = namedtuple("Record", "topic partition offset key value headers timestamp")
TOPIC = "assignments.commands"
AT = datetime(2026, 12, 6, tzinfo=UTC)


def records(partition: int, *offsets: int) -> list[Record]:
    command = orjson.dumps({"type": "create_user", "user_id": 1})
    return [Record(TOPIC, partition, offset, b"1", command, [], 1_700_000_000_000) for offset in offsets]


class Journal:
    """Everything the fakes were told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []


class FakePublisher:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.gates: dict[int, asyncio.Event] = {}  # the first offset of a batch → released when set
        self.fail_first: set[int] = set()

    async def publish(self, processed: list[Processed], token: str, contexts) -> None:
        first = processed[0].parsed.record.offset
        gate = self.gates.get(first)
        if gate is not None:
            await gate.wait()
        if first in self.fail_first:
            raise RuntimeError("broker refused")
        self.journal.events.append(("published", first, token))


class FakeCommitter:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def hand_over(self, offsets: dict[TopicPartition, int]) -> None:
        self.journal.events.append(("offsets", {tp.partition: offset for tp, offset in offsets.items()}))


class FakeKafkaConsumer:
    """Assigned partitions 0 and 1; like aiokafka, it refuses the highwater of any other."""

    assigned = frozenset({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)})

    def assignment(self) -> frozenset[TopicPartition]:
        return self.assigned

    def highwater(self, tp: TopicPartition) -> int:
        assert tp in self.assigned, "Partition is not assigned"
        return 100


class RecordingObserver:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def observe(self, partitions, parsed):
        journal = self.journal

        class Observation:
            @contextlib.contextmanager
            def applying(self):
                journal.events.append(("applying", [tp.partition for tp in partitions]))
                yield

            def applied(self, result: BatchResult) -> None:
                journal.events.append(("applied", len(result.processed)))

            @contextlib.contextmanager
            def publishing(self):
                yield

            def outcome_contexts(self):
                return None

            def published(self, result: BatchResult) -> None:
                journal.events.append(("observed published", result.next_offsets[next(iter(result.records))]))

        return Observation()

    def retrying(self, stalled, attempt, error) -> None:
        self.journal.events.append(("retrying", attempt))


def pipeline(journal: Journal, apply=None) -> tuple[BatchPipeline, FakePublisher]:
    publisher = FakePublisher(journal)
    made = BatchPipeline(ConsumerSettings(_env_file=None), KafkaSettings(_env_file=None), 86_400, pool=None,
                         kafka_consumer=FakeKafkaConsumer(), publisher=publisher, committer=FakeCommitter(journal))
    made._observers = lambda: [RecordingObserver(journal)]

    async def applied(batches, parsed):
        if apply is not None:
            await apply(batches, parsed)
        outcome = OutcomeRow("c", "create_user", "applied", None, {}, AT, TOPIC, 0, 0)
        return [Processed(item, outcome, False) for item in parsed], "0/1"

    made._apply = applied
    return made, publisher


async def test_offsets_are_handed_over_only_after_the_outcomes_are_published():
    journal = Journal()
    made, _ = pipeline(journal)
    await made.run({TopicPartition(TOPIC, 0): records(0, 5, 6, 7)})
    await asyncio.gather(*made.publishing())
    assert journal.events == [("applying", [0]), ("applied", 3), ("published", 5, "0/1"), ("offsets", {0: 8}),
                              ("observed published", 8)]


async def test_a_partitions_next_batch_publishes_after_the_one_before_it():
    journal = Journal()
    made, publisher = pipeline(journal)
    publisher.gates[1] = asyncio.Event()  # the first batch's acknowledgement is slow
    partition = TopicPartition(TOPIC, 0)
    await made.run({partition: records(0, 1, 2)})
    second = asyncio.create_task(made.run({partition: records(0, 3, 4)}))
    await asyncio.sleep(0.05)
    assert ("applied", 2) in journal.events and not second.done()  # applied, waiting to publish
    assert not any(event[0] == "offsets" for event in journal.events)
    publisher.gates[1].set()
    await second
    await asyncio.gather(*made.publishing())
    assert [event for event in journal.events if event[0] == "offsets"] == [("offsets", {0: 3}), ("offsets", {0: 5})]


async def test_a_failed_publish_stops_the_partitions_next_batch():
    journal = Journal()
    made, publisher = pipeline(journal)
    publisher.fail_first.add(1)
    partition = TopicPartition(TOPIC, 0)
    await made.run({partition: records(0, 1)})
    await asyncio.gather(*made.publishing(), return_exceptions=True)
    with pytest.raises(RuntimeError, match="broker refused"):
        await made.run({partition: records(0, 2)})
    assert not any(event[0] == "offsets" for event in journal.events)  # nothing past the failed batch


async def test_a_shared_batch_that_meets_a_row_lock_splits_by_partition():
    async def locked(batches, parsed):
        raise asyncpg.LockNotAvailableError("canceling statement due to lock timeout")

    made, _ = pipeline(Journal(), apply=locked)
    first, second = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    with pytest.raises(SharedBatchBlocked) as blocked:
        await made.run({first: records(0, 10, 11), second: records(1, 20)})
    assert {tp: [item.record.offset for item in parsed] for tp, parsed in blocked.value.parsed.items()} == {
        first: [10, 11], second: [20]}
    with pytest.raises(asyncpg.LockNotAvailableError):  # a partition's own batch does not split
        await made.run({first: records(0, 12)})


async def test_a_partition_taken_by_a_rebalance_while_its_outcomes_are_acknowledged_stops_nothing():
    journal = Journal()
    made, _ = pipeline(journal)
    del made._observers  # the pipeline's own observers: the metrics read each partition's highwater
    await made.run({TopicPartition(TOPIC, 7): records(7, 1, 2)})  # no longer assigned when published
    await asyncio.gather(*made.publishing())  # raises if the lag metric asked for its highwater
    assert ("offsets", {7: 3}) in journal.events
