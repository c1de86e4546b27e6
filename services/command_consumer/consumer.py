"""The Kafka loop: fetch → validate → apply per partition in parallel → publish outcomes → commit.

aiokafka directly rather than a FastStream subscriber: the consumer needs whole per-partition
batches in one transaction, parallel partitions, manual commits strictly after the outcomes are
durable, and commit-on-revoke; FastStream hides those behind its per-message handlers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
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
        # Finish the batch in hand (it commits) before the partitions move.
        async with self._consumer.processing:
            log.info("partitions revoked", partitions=[f"{tp.topic}:{tp.partition}" for tp in revoked])

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned", partitions=[f"{tp.topic}:{tp.partition}" for tp in assigned])


class CommandConsumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.processing = asyncio.Lock()
        self.stopping = asyncio.Event()
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
        try:
            while not self.stopping.is_set():
                fetched = await self.consumer.getmany(timeout_ms=200, max_records=self.settings.consumer_max_batch)
                if not fetched:
                    continue
                async with self.processing:
                    await self._process(fetched)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def _process(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        parsed_by_partition = {
            tp: [parse_record(RecordRef(r.topic, r.partition, r.offset, r.key, r.value,
                                        tuple(r.headers or ()), r.timestamp),
                              self.settings) for r in records]
            for tp, records in fetched.items()
        }
        self._check_poison_guard([p for batch in parsed_by_partition.values() for p in batch])
        # Segment partitions first: a segment and a user command fetched together apply in that
        # order (there is no order across topics, but this is the one producers expect).
        results = []
        for topic in self.settings.command_topics:
            results += await asyncio.gather(*(self._process_partition(tp, batch)
                                              for tp, batch in parsed_by_partition.items() if tp.topic == topic))
        offsets = {tp: batch[-1].record.offset + 1 for tp, batch in parsed_by_partition.items()}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # The partitions moved on: their new owner redelivers and the inbox makes that harmless.
            log.warning("offset commit refused after rebalance", error=str(error))
        self._update_lag(offsets)
        counts = collections.Counter((item.outcome["type"] or "unknown", item.outcome["status"])
                                     for processed in results for item in processed if not item.replayed)
        for (command_type, status), count in counts.items():
            metrics.COMMANDS.labels(command_type, status).inc(count)

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

    def _update_lag(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, next_offset in offsets.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))


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
