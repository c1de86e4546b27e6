"""The Kafka loop: fetch → validate → apply → publish outcomes → commit, each partition on its own.

Every assigned partition has at most one batch in hand, applied in one transaction, its outcomes
published, then its offset committed, while the other partitions do the same: Python work
(parsing, deciding, publishing) for one partition overlaps the database work of the others, and a
slow partition holds back only itself. The fetch loop hands a partition its next batch as soon
as it is free.

aiokafka directly rather than a FastStream subscriber: the consumer needs whole per-partition
batches in one transaction, parallel partitions, manual commits strictly after the outcomes are
durable, and commit-on-revoke; FastStream hides those behind its per-message handlers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Collection
from typing import Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, MessageSizeTooLargeError

from services.command_consumer import metrics
from services.command_consumer.batch import Processed, apply_batch
from services.command_consumer.parsing import InvalidRecord, RecordRef, parse_record
from shared.db import TRANSIENT_DB_ERRORS
from shared.kafka import create_producer
from shared.settings import Settings

log = structlog.get_logger("command_consumer")


class PoisonGuardTripped(RuntimeError):
    """Most recent records are invalid: more likely a bad producer deploy than real commands."""


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable through every retry; nothing of the batch was committed."""


class _CommitOnRevoke(ConsumerRebalanceListener):
    def __init__(self, consumer: CommandConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        # Finish the batches in hand (each commits) before the partitions move.
        await self._consumer.finish_in_hand()
        log.info("partitions revoked", partitions=[f"{tp.topic}:{tp.partition}" for tp in revoked])

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned", partitions=[f"{tp.topic}:{tp.partition}" for tp in assigned])


class CommandConsumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.stopping = asyncio.Event()
        self._in_hand: dict[TopicPartition, asyncio.Task] = {}  # at most one batch per partition
        self._freed = asyncio.Event()  # a partition finished its batch
        self._recent_invalid: collections.deque[bool] = collections.deque(maxlen=settings.poison_guard_window)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.require_kafka(),
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
            max_partition_fetch_bytes=settings.max_command_bytes * 3,
            fetch_max_bytes=max(52_428_800, settings.max_command_bytes * 3),
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
            max_poll_interval_ms=900_000,
        )
        self.producer = create_producer(settings)

    async def run(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe(list(self.settings.command_topics), listener=_CommitOnRevoke(self))
        log.info("consuming", topics=list(self.settings.command_topics), group=self.settings.consumer_group)
        graceful = False
        try:
            while not self.stopping.is_set():
                self._reap()
                idle = [tp for tp in self.consumer.assignment() if tp not in self._in_hand]
                if idle:
                    fetched = await self._fetch_first(idle)
                elif self._in_hand:
                    await self._wait_freed(timeout=0.2)
                    continue
                else:  # not assigned yet: getmany waits for the group
                    fetched = await self.consumer.getmany(timeout_ms=200, max_records=self.settings.consumer_max_batch)
                if fetched:
                    # The other free partitions' records came in the same fetch response: hand them
                    # out together, so that segment batches go first.
                    for tp in self.consumer.assignment():
                        if tp not in fetched and tp not in self._in_hand:
                            fetched.update(await self.consumer.getmany(
                                tp, timeout_ms=0, max_records=self.settings.consumer_max_batch))
                    self._dispatch(fetched)
            graceful = True
        finally:
            try:
                if graceful:  # finish the batches in hand; one that failed meanwhile still says so
                    await self.finish_in_hand()
                    self._reap()
            finally:
                # Failing or cancelled: abandon what is in hand (rolled back, offsets not committed).
                for task in self._in_hand.values():
                    task.cancel()
                await asyncio.gather(*self._in_hand.values(), return_exceptions=True)
                await self.consumer.stop()
                await self.producer.stop()
                log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def finish_in_hand(self) -> None:
        """Wait for every batch in hand to be applied, published and committed (or to fail)."""
        if self._in_hand:
            await asyncio.wait(list(self._in_hand.values()))

    def _reap(self) -> None:
        """Forget finished batches; a batch that failed stops the consumer with its error."""
        for tp, task in list(self._in_hand.items()):
            if task.done():
                del self._in_hand[tp]
                task.result()

    async def _wait_freed(self, timeout: float) -> None:
        self._freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), timeout)

    async def _fetch_first(self, idle: list[TopicPartition]) -> dict[TopicPartition, list[Any]]:
        """Records of the free partitions, or nothing once a busy partition is freed first.

        Cancelling getmany while it waits drains nothing (records leave aiokafka's buffer only
        in the step that returns them), so no record is lost by giving up on it.
        """
        fetch = asyncio.ensure_future(self.consumer.getmany(
            *idle, timeout_ms=200, max_records=self.settings.consumer_max_batch))
        if not self._in_hand:
            return await fetch
        self._freed.clear()
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            await asyncio.wait({fetch, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            fetch.cancel()  # a no-op when it has returned
        try:
            return await fetch
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this loop is being cancelled, not just the fetch
                raise
            return {}

    def _dispatch(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        # Segment batches first, and user batches wait for the segment batches in hand: a segment
        # and a user command fetched together apply in that order (there is no order across
        # topics, but this is the one producers expect).
        segments_topic = self.settings.segments_commands_topic
        for tp in sorted(fetched, key=lambda tp: tp.topic != segments_topic):
            barrier = [] if tp.topic == segments_topic else [
                task for held, task in self._in_hand.items() if held.topic == segments_topic]
            self._in_hand[tp] = asyncio.create_task(self._handle(tp, fetched[tp], barrier))

    async def _handle(self, tp: TopicPartition, records: list[Any], barrier: Collection[asyncio.Task]) -> None:
        try:
            if barrier:
                await asyncio.wait(barrier)
            batch = [parse_record(RecordRef(r.topic, r.partition, r.offset, r.key, r.value,
                                            tuple(r.headers or ()), r.timestamp), self.settings)
                     for r in records]
            self._check_poison_guard(batch)
            processed = await self._process_partition(tp, batch)
            next_offset = batch[-1].record.offset + 1
            try:
                await self.consumer.commit({tp: next_offset})
            except (CommitFailedError, IllegalStateError) as error:
                # The partition moved on: its new owner redelivers and the inbox makes that harmless.
                log.warning("offset commit refused after rebalance", topic=tp.topic, partition=tp.partition,
                            error=str(error))
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))
            counts = collections.Counter((item.outcome["type"] or "unknown", item.outcome["status"])
                                         for item in processed if not item.replayed)
            for (command_type, status), count in counts.items():
                metrics.COMMANDS.labels(command_type, status).inc(count)
        finally:
            self._freed.set()

    def _check_poison_guard(self, batch) -> None:
        self._recent_invalid.extend(isinstance(p, InvalidRecord) for p in batch)
        window = self._recent_invalid
        if len(window) == window.maxlen:
            share = sum(window) / len(window)
            if share >= self.settings.poison_guard_max_invalid_share:
                raise PoisonGuardTripped(
                    f"{share:.0%} of the last {len(window)} records are invalid "
                    f"(limit POISON_GUARD_MAX_INVALID_SHARE={self.settings.poison_guard_max_invalid_share}); "
                    "stopped without dead-lettering them. Fix the producer, then restart the consumer."
                )

    async def _process_partition(self, tp: TopicPartition, batch) -> list[Processed]:
        started = time.monotonic()
        processed = await self._apply_with_retry(tp, batch)
        durable_at = time.time()
        metrics.BATCH_DURATION.observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        await self._publish(processed)
        for item in processed:
            if item.parsed.record.timestamp_ms is not None and not item.replayed:
                metrics.COMMAND_LATENCY.observe(max(0.0, durable_at - item.parsed.record.timestamp_ms / 1000))
        return processed

    async def _apply_with_retry(self, tp: TopicPartition, batch) -> list[Processed]:
        delay = 0.1
        for attempt in range(1, self.settings.db_retry_attempts + 1):
            try:
                async with self.pool.acquire() as conn:
                    return await apply_batch(conn, batch)
            except (*TRANSIENT_DB_ERRORS, asyncpg.UniqueViolationError) as error:
                metrics.DB_RETRIES.inc()
                log.warning("batch transaction failed, will retry", topic=tp.topic, partition=tp.partition,
                            first_offset=batch[0].record.offset, attempt=attempt, error=repr(error))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.settings.db_retry_max_backoff_seconds)
        raise DatabaseUnavailable(
            f"partition {tp.topic}:{tp.partition} stalled at offset {batch[0].record.offset}: the database failed "
            f"{self.settings.db_retry_attempts} attempts; nothing of it was committed"
        )

    async def _publish(self, processed: list[Processed]) -> None:
        deliveries = []
        debug = log.is_enabled_for(logging.DEBUG)
        for item in processed:
            record = item.parsed.record
            outcome = item.outcome
            headers = [("command-id", outcome["command_id"].encode()),
                       ("command-type", (outcome["type"] or "").encode()),
                       ("status", outcome["status"].encode())]
            traceparent = record.header("traceparent")
            if traceparent is not None:
                headers.append(("traceparent", traceparent))
            deliveries.append(await self.producer.send(
                self.settings.results_topic, orjson.dumps(outcome), key=outcome["command_id"].encode(),
                headers=headers))
            if isinstance(item.parsed, InvalidRecord):
                deliveries.append(await self._dead_letter(item.parsed))
                if not item.replayed:
                    metrics.DLQ_RECORDS.labels(item.parsed.code).inc()
            if item.replayed:
                metrics.REPLAYED.inc()
            if outcome["status"] != "applied" or item.replayed or debug:
                _log_outcome(item, traceparent)
        await asyncio.gather(*deliveries)

    async def _dead_letter(self, invalid: InvalidRecord):
        record = invalid.record
        try:
            return await self.producer.send(self.settings.dlq_topic, record.value, key=record.key,
                                            headers=_dlq_headers(invalid))
        except MessageSizeTooLargeError:
            # Larger than any record we may publish: keep key, reason and position, drop the value,
            # rather than stall the partition on it.
            size = str(len(record.value or b"")).encode()
            return await self.producer.send(self.settings.dlq_topic, None, key=record.key,
                                            headers=[*_dlq_headers(invalid), ("x-original-value-bytes", size)])


def _log_outcome(item: Processed, traceparent: bytes | None) -> None:
    """One line per command that was not simply applied (all of them at DEBUG), with its trace."""
    record, outcome = item.parsed.record, item.outcome
    error = outcome["error"] or {}
    fields = {"command_id": outcome["command_id"], "type": outcome["type"], "status": outcome["status"],
              "code": error.get("code"), "reason": error.get("message"),
              "traceparent": traceparent.decode(errors="replace") if traceparent else None,
              "topic": record.topic, "partition": record.partition, "offset": record.offset}
    if item.replayed:
        log.info("command seen again, stored outcome re-published", **fields)
    elif outcome["status"] == "invalid":
        log.warning("dead-lettered", **fields)
    elif outcome["status"] == "rejected":
        log.info("command rejected", **fields)
    else:
        log.debug("command applied", **fields)


def _dlq_headers(invalid: InvalidRecord) -> list[tuple[str, bytes]]:
    record = invalid.record
    return [
        ("x-error-code", str(invalid.code).encode()),
        ("x-error-message", invalid.message.encode()[:4000]),
        ("x-original-topic", record.topic.encode()),
        ("x-original-partition", str(record.partition).encode()),
        ("x-original-offset", str(record.offset).encode()),
        ("x-command-id", invalid.command_id.encode()),
    ]
