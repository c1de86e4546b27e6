"""Removes explicit memberships whose expiry has passed, in batches, safely with many workers.

Rows are claimed with FOR UPDATE SKIP LOCKED, so workers never wait on each other or on the
command consumer; the DELETE re-checks `expires_at` under the lock, so a TTL extended or made
permanent meanwhile is left alone. History rows are written in the same transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, Histogram

from services.expiry_worker import member_counts
from services.expiry_worker.partitions import PartitionMaintainer
from shared import tracing
from shared.db import TRANSIENT_DB_ERRORS, Backoff, writable
from shared.membership import HISTORY_COLUMNS, HistoryRow, Segment, leaves_at_expiry
from shared.metrics import observe_all

log = structlog.get_logger("expiry_worker")

EXPIRED = Counter("segmentation_memberships_expired_total", "Explicit memberships removed at their expiry")
BACKLOG = Gauge("segmentation_expiry_backlog",
                "Memberships past their expiry but not yet removed, counted up to BACKLOG_COUNTED_BATCHES batches")
LAG = Histogram("segmentation_expiry_lag_seconds", "From a membership's expires_at to its removal",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
BATCH_DURATION = Histogram("segmentation_expiry_batch_seconds", "Duration of one expiry batch transaction")

# The backlog is counted up to this many batches. A larger one is being drained as fast as the
# worker goes, and counting it exactly visits every due row's tuple (rows that fell due lately
# are not all-visible) every few seconds of the drain, on the cores the hot reads need.
BACKLOG_COUNTED_BATCHES = 10
BACKLOG_SQL = "SELECT count(*) FROM (SELECT FROM memberships WHERE expires_at <= now() LIMIT $1) AS due"

# One statement: claim due rows (skipping rows another worker or the command consumer holds),
# delete them re-checking the expiry under the lock, keep their spans, and record the exits of
# segments without a rollout. Rows of rollout segments come back for the coverage check, which needs the hash.
EXPIRE_SQL = """
WITH due AS (
    SELECT ctid FROM memberships
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), gone AS (
    -- The locked rows by their physical address (a TID scan, not a key look-up each); the
    -- expiry is checked again under the lock, in a form no index answers, so that the planner
    -- takes the TID scan whatever its statistics say of how many rows are due: an index scan on
    -- the expiry would read every due row for each batch's addresses.
    DELETE FROM memberships m USING segments s
    WHERE m.ctid = ANY(ARRAY(SELECT ctid FROM due)) AND s.id = m.segment_id AND (m.expires_at <= now()) IS TRUE
      AND s.deleted_at IS NULL  -- a deleted segment's members are its removal's to record
    RETURNING m.user_id, m.segment_id, s.slug, s.percent, m.expires_at, m.added_at, s.rolled_at
), spans AS (
    -- Kept where the segment had a rollout event since the row started (ExplicitSpan).
    INSERT INTO explicit_spans (segment_id, user_id, since, ended)
    SELECT segment_id, user_id, added_at, expires_at FROM gone WHERE rolled_at >= added_at
), recorded AS (
    INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason, expires_at)
    SELECT user_id, slug, 'D', expires_at, 'manual', 'ttl', expires_at FROM gone WHERE percent = 0
)
SELECT count(*) AS removed,
       array_agg(EXTRACT(EPOCH FROM clock_timestamp() - expires_at)::float8) AS lags,
       array_agg(user_id) FILTER (WHERE percent > 0) AS rollout_users,
       array_agg(segment_id) FILTER (WHERE percent > 0) AS rollout_segment_ids,
       array_agg(slug) FILTER (WHERE percent > 0) AS rollout_slugs,
       array_agg(percent) FILTER (WHERE percent > 0) AS rollout_percents,
       array_agg(expires_at) FILTER (WHERE percent > 0) AS rollout_expiries
FROM gone
"""


@dataclass(frozen=True)
class BatchResult:
    removed: int
    full: bool
    lags: list[float]  # seconds from each row's expiry to its removal


async def expire_batch(conn: asyncpg.Connection, batch_size: int) -> BatchResult:
    started = time.monotonic()
    async with conn.transaction():
        # One row of arrays rather than a row per membership: a backlog batch is large.
        batch = await conn.fetchrow(EXPIRE_SQL, batch_size)
        rollout_rows = zip(batch["rollout_users"] or (), batch["rollout_segment_ids"] or (),
                           batch["rollout_slugs"] or (),
                           batch["rollout_percents"] or (), batch["rollout_expiries"] or (), strict=True)
        # A user the segment's rollout still covers stays in: no exit to record.
        history = [HistoryRow(user_id, slug, "D", expires_at, "manual", "ttl", None, expires_at)
                   for user_id, segment_id, slug, percent, expires_at in rollout_rows
                   if leaves_at_expiry(Segment(segment_id, slug, percent), user_id)]
        if history:
            await conn.copy_records_to_table("membership_history", records=history, columns=HISTORY_COLUMNS)
    lags = [max(0.0, lag) for lag in batch["lags"] or ()]
    observe_all(LAG, lags)
    EXPIRED.inc(batch["removed"])
    BATCH_DURATION.observe(time.monotonic() - started)
    return BatchResult(batch["removed"], batch["removed"] >= batch_size, lags)


async def seconds_until_next_expiry(conn: asyncpg.Connection) -> float | None:
    return await conn.fetchval(
        "SELECT EXTRACT(EPOCH FROM min(expires_at) - now())::float8 FROM memberships WHERE expires_at IS NOT NULL"
    )


class ExpiryWorker:
    def __init__(self, pool: asyncpg.Pool, batch_size: int, max_sleep_seconds: float,
                 on_batch: Callable[[BatchResult], None] | None = None, concurrency: int = 1,
                 maintainer: PartitionMaintainer | None = None) -> None:
        self.pool = pool
        self.maintainer = maintainer  # partition maintenance, run alongside (services/expiry_worker/partitions.py)
        self.concurrency = concurrency
        self.on_batch = on_batch
        self.batch_size = batch_size
        self.max_sleep_seconds = max_sleep_seconds
        self.stopping = asyncio.Event()
        self._backlog_checked = 0.0

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        log.info("expiring memberships", batch_size=self.batch_size, max_sleep_seconds=self.max_sleep_seconds,
                 concurrency=self.concurrency)
        # SKIP LOCKED keeps concurrent claims disjoint, so a backlog drains on several connections.
        maintenance = [self.maintainer.run(self.stopping)] if self.maintainer else []
        await asyncio.gather(*(self._loop() for _ in range(self.concurrency)), *maintenance)
        log.info("stopped")

    async def _loop(self) -> None:
        backoff = Backoff(5.0)
        while not self.stopping.is_set():
            try:
                async with writable(self.pool) as conn:
                    result = await self._expire(conn)
                    if self.on_batch:
                        self.on_batch(result)
                    if result.removed:
                        log.info("memberships expired", count=result.removed)
                    await self._now_and_then(conn)
                    if result.full:
                        continue  # more are due: loop at once
                    wait = await seconds_until_next_expiry(conn)
                backoff.reset()
            except TRANSIENT_DB_ERRORS as error:
                wait = backoff.next()
                log.warning("database unavailable, retrying", error=repr(error), retry_in=round(wait, 3))
            sleep = self.max_sleep_seconds if wait is None else min(max(wait, 0.005), self.max_sleep_seconds)
            try:
                await asyncio.wait_for(self.stopping.wait(), sleep)
            except TimeoutError:
                pass

    async def _expire(self, conn: asyncpg.Connection) -> BatchResult:
        if not tracing.ENABLED:
            return await expire_batch(conn, self.batch_size)
        with tracing.tracer().start_as_current_span("expire memberships") as span:
            result = await expire_batch(conn, self.batch_size)
            span.set_attribute("segmentation.expired", result.removed)
            return result

    async def _now_and_then(self, conn: asyncpg.Connection) -> None:
        """Every few seconds: the backlog gauge, and the segments' member counts folded."""
        if time.monotonic() - self._backlog_checked < 5:
            return
        self._backlog_checked = time.monotonic()
        BACKLOG.set(await conn.fetchval(BACKLOG_SQL, BACKLOG_COUNTED_BATCHES * self.batch_size))
        await member_counts.fold(conn)
