"""One partition's batch from start to end: parse → guard → apply in one transaction (retried)
→ publish outcomes and dead letters → commit the offset. Nothing is committed before the batch's
effects and outcomes are durable in PostgreSQL and acknowledged by Kafka."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.command_consumer import telemetry
from services.command_consumer.batch import Processed, apply_batch
from services.command_consumer.parsing import ParsedRecord, RecordRef, parse_record
from services.command_consumer.poison_guard import PoisonGuard
from services.command_consumer.publishing import OutcomePublisher
from services.command_consumer.retry import with_retry
from services.command_consumer.spans import BatchTrace
from shared import tracing
from shared.settings import Settings

log = structlog.get_logger("command_consumer")


class BatchPipeline:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, kafka_consumer: AIOKafkaConsumer,
                 publisher: OutcomePublisher) -> None:
        self._settings = settings
        self._pool = pool
        self._kafka_consumer = kafka_consumer
        self._publisher = publisher
        self._guard = PoisonGuard(settings.poison_guard_window, settings.poison_guard_max_invalid_share)

    async def run(self, tp: TopicPartition, records: list[Any]) -> None:
        batch = [parse_record(RecordRef(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()),
                                        r.timestamp), self._settings)
                 for r in records]
        self._guard.check(batch)
        started = time.monotonic()
        traced = BatchTrace(tp, batch) if tracing.ENABLED else None
        # A batch that is not sampled records no database spans: skip their instrumentation too.
        quiet = traced is not None and not traced.recording
        with traced or contextlib.nullcontext():
            with suppress_instrumentation() if quiet else contextlib.nullcontext():
                processed, token = await self._apply(tp, batch)
            applied_in, durable_at = time.monotonic() - started, time.time()
            spans = traced.command_spans(processed) if traced else None
            await self._publisher.publish(processed, token, spans)
        if traced:
            traced.finish(spans)
        next_offset = batch[-1].record.offset + 1
        try:
            await self._kafka_consumer.commit({tp: next_offset})
        except (CommitFailedError, IllegalStateError) as error:
            # The partition moved on: its new owner redelivers and the inbox makes that harmless.
            log.warning("offset commit refused after rebalance", topic=tp.topic, partition=tp.partition,
                        error=str(error))
        telemetry.batch_applied(processed, applied_in, durable_at)
        telemetry.lag(tp, self._kafka_consumer.highwater(tp), next_offset)

    async def _apply(self, tp: TopicPartition, batch: list[ParsedRecord]) -> tuple[list[Processed], str]:
        """The batch applied and committed, and the consistency token of its outcomes: the WAL
        position right after the commit, so at or after it (one query a batch, nothing stored)."""
        async def attempt():
            async with self._pool.acquire() as conn:
                processed = await apply_batch(conn, batch, self._settings.outcome_retention)
                return processed, await conn.fetchval("SELECT pg_current_wal_lsn()::text")

        first_offset = batch[0].record.offset
        return await with_retry(
            attempt, attempts=self._settings.db_retry_attempts,
            max_backoff=self._settings.db_retry_max_backoff_seconds,
            where=f"partition {tp.topic}:{tp.partition} stalled at offset {first_offset}",
            on_retry=lambda number, error: telemetry.retry(tp, first_offset, number, error))
