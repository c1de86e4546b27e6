"""One batch from start to end: parse → guard → apply in one transaction (retried) → publish
outcomes and dead letters → hand the offsets to the committer. A batch holds the records of one
partition, or of several partitions of one topic fetched together while the load is light (see
CommandConsumer._dispatch). No offset is handed over before the batch's effects and outcomes are
durable in PostgreSQL and acknowledged by Kafka.

A batch's partitions are free for their next batch once its transaction has committed: its
outcomes are published meanwhile (`BatchPipeline.publishing`), so a partition's cycle is the
longer of a transaction and a publish, not their sum. At most one publish per partition is
outstanding, and they hand offsets over in order: a batch publishes only after the previous
batch of each of its partitions has been acknowledged (and not at all if that one failed). A
crash before an acknowledgement loses nothing: the offsets were not committed, and the inbox
answers the redelivered commands with their stored outcomes."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.command_consumer.batch import Processed, apply_batch
from services.command_consumer.metrics import PUBLISH_FAILURES
from services.command_consumer.observers import BatchObserver, BatchResult, Observations
from services.command_consumer.offsets import OffsetCommitter
from services.command_consumer.parsing import ParsedRecord, RecordRef, parse_record
from services.command_consumer.poison_guard import PoisonGuard
from services.command_consumer.publishing import OutcomePublisher
from services.command_consumer.retry import with_retry
from services.command_consumer.spans import TracingObserver
from services.command_consumer.telemetry import MetricsObserver
from shared import tracing
from shared.db import writable
from shared.settings import ConsumerSettings, KafkaSettings

log = structlog.get_logger("command_consumer")


class SharedBatchBlocked(Exception):
    """A batch of several partitions waited longer than CONSUMER_SHARED_LOCK_TIMEOUT_MS for a row
    lock (a long transaction elsewhere holds a user's rows) and was rolled back: each partition
    goes on in a batch of its own, so the lock holds back only its own partition. `parsed`: the
    batch's parsed records by partition (parsed and counted by the poison guard once)."""

    def __init__(self, parsed: dict[TopicPartition, list[ParsedRecord]]) -> None:
        super().__init__(f"a batch of {len(parsed)} partitions waited for a row lock")
        self.parsed = parsed


class BatchPipeline:
    def __init__(self, settings: ConsumerSettings, kafka: KafkaSettings, outcome_retention: int, pool: asyncpg.Pool,
                 kafka_consumer: AIOKafkaConsumer, publisher: OutcomePublisher, committer: OffsetCommitter) -> None:
        self._settings = settings
        self._segments_topic = kafka.segments_commands_topic
        self._max_command_bytes = kafka.max_command_bytes
        self._outcome_retention = outcome_retention
        self._pool = pool
        self._kafka_consumer = kafka_consumer
        self._publisher = publisher
        self._committer = committer
        self._guard = PoisonGuard(settings.poison_guard_window, settings.poison_guard_max_invalid_share)
        self._metrics = MetricsObserver(self._highwater)
        self.behind = self._metrics.behind  # told of each batch fetched, reported every turn of the loop
        self._tracing = TracingObserver()
        self._publishing: dict[TopicPartition, asyncio.Task] = {}  # each partition's last publish, until it succeeds
        self.on_removal_queued: Callable[[], None] = lambda: None  # a segment's members are left to remove

    def publishing(self) -> set[asyncio.Task]:
        """The publishes not yet done, and those that failed (kept, so that the consumer sees why)."""
        return set(self._publishing.values())

    async def run(self, batches: dict[TopicPartition, list[Any]], parsed: list[ParsedRecord] | None = None) -> None:
        """Apply the records of these partitions (each in its order) as one batch; `parsed`: the
        records already parsed and guarded (a shared batch's part, see SharedBatchBlocked)."""
        if parsed is None:
            parsed = [parse_record(RecordRef(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()),
                                             r.timestamp), self._segments_topic, self._max_command_bytes)
                      for records in batches.values() for r in records]
            self._guard.check(parsed)
        started = time.monotonic()
        observations = Observations(self._observers(), list(batches), parsed)
        with observations.applying():
            try:
                processed, token = await self._apply(batches, parsed)
            except asyncpg.LockNotAvailableError:
                if len(batches) == 1:
                    raise
                by_partition: dict[TopicPartition, list[ParsedRecord]] = {tp: [] for tp in batches}
                for item in parsed:
                    by_partition[TopicPartition(item.record.topic, item.record.partition)].append(item)
                raise SharedBatchBlocked(by_partition) from None
            self._hold_pending(processed)
            result = BatchResult(batches, processed, token, time.monotonic() - started, time.time())
            observations.applied(result)
            await self._after_previous_publishes(batches)
        publishing = asyncio.create_task(self._publish(result, observations))
        for tp in batches:
            self._publishing[tp] = publishing
        publishing.add_done_callback(self._forget)

    def _hold_pending(self, processed: list[Processed]) -> None:
        """Applied commands whose outcome is not stored yet keep their partition's commit at them."""
        pending = [item for item in processed if item.pending]
        for item in pending:
            record = item.parsed.record
            self._committer.hold(TopicPartition(record.topic, record.partition), record.offset, item.parsed.command_id)
        if pending:
            self.on_removal_queued()

    async def _after_previous_publishes(self, batches: dict[TopicPartition, Any]) -> None:
        """Wait until the previous batch of each of these partitions is published; raise if one
        was not (its offsets must not be passed by this batch's)."""
        previous = {self._publishing[tp] for tp in batches if tp in self._publishing}
        if not previous:
            return
        await asyncio.wait(previous)
        for task in previous:
            if task.cancelled():
                raise RuntimeError("the previous batch's outcomes were abandoned before they were acknowledged")
            task.result()

    async def _publish(self, result: BatchResult, observations: Observations) -> None:
        with observations.publishing():
            try:
                await self._publisher.publish(result.processed, result.token, observations.outcome_contexts())
            except Exception:
                PUBLISH_FAILURES.inc()
                raise
        result.published_at = time.time()
        self._committer.hand_over(result.next_offsets)
        observations.published(result)

    def _highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end as last fetched; None once it is no longer assigned here (a rebalance
        can take it while its last batch's outcomes are still being acknowledged)."""
        return self._kafka_consumer.highwater(tp) if tp in self._kafka_consumer.assignment() else None

    def _observers(self) -> list[BatchObserver]:
        """Metrics always; tracing while it is on (it can be turned on after the pipeline is made)."""
        return [self._metrics, self._tracing] if tracing.ENABLED else [self._metrics]

    def _forget(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        for tp in [tp for tp, last in self._publishing.items() if last is task]:
            del self._publishing[tp]

    async def _apply(self, batches: dict[TopicPartition, list[Any]],
                     batch: list[ParsedRecord]) -> tuple[list[Processed], str]:
        """The batch applied and committed, and the consistency token of its outcomes: the WAL
        position right after the commit, so at or after it (one query a batch, nothing stored)."""
        # A shared batch gives up on a row lock soon (SharedBatchBlocked); a partition's own waits.
        lock_timeout_ms = self._settings.consumer_shared_lock_timeout_ms if len(batches) > 1 else None

        async def attempt():
            async with writable(self._pool) as conn:
                processed = await apply_batch(conn, batch, self._outcome_retention, lock_timeout_ms,
                                              self._settings.consumer_segment_removal_chunk or None)
                return processed, await conn.fetchval("SELECT pg_current_wal_lsn()::text")

        stalled = {f"{tp.topic}:{tp.partition}": records[0].offset for tp, records in batches.items()}
        return await with_retry(
            attempt, attempts=self._settings.db_retry_attempts,
            max_backoff=self._settings.db_retry_max_backoff_seconds,
            where=", ".join(f"partition {where} stalled at offset {offset}" for where, offset in stalled.items()),
            on_retry=functools.partial(self._retrying, stalled))

    def _retrying(self, stalled: dict[str, int], attempt: int, error: BaseException) -> None:
        for observer in self._observers():
            observer.retrying(stalled, attempt, error)
