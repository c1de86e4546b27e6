"""Sends every change waiting in the outbox (migrations/0007) to the membership-changes topic,
then deletes it: a change leaves the outbox only once the broker has acknowledged it, so a crash
of anything at any moment at worst publishes a change again, with the same event id.

Order: each read takes the committed outbox entries (one per writing statement) in `seq` order,
and the next read starts only after their acknowledgement, so a change is published after every
change that was visible before it.
Two changes of one membership are numbered in commit order (the trigger runs after the row lock
is taken), and a user's commands are applied one transaction after another, so a user's events
reach the topic in the order their changes committed; records of one key go to one partition in
the order they are handed over.

One publisher is active at a time: it holds a session advisory lock on the connection it reads
and deletes with, so losing that connection stops it before another can take over. Others
standing by retry the lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from shared.changes import OUTBOX_COLUMNS, entry_changes, record_of
from shared.db import TRANSIENT_DB_ERRORS, Backoff
from shared.kafka import send_batched
from shared.metrics import observe_all

log = structlog.get_logger("change_publisher")

# The advisory lock key that makes one publisher active ("segmentation change publisher").
LOCK_KEY = 0x5E6_C4A6E

PUBLISHED = Counter("segmentation_changes_published_total", "Membership-change events acknowledged by the broker",
                    ["kind"])
LAG = Histogram("segmentation_change_publish_lag_seconds",
                "From a change's write in its transaction to the broker's acknowledgement of its event",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
OLDEST = Gauge("segmentation_changes_oldest_unpublished_seconds",
               "Age of the oldest committed change not yet published (0: none waiting)")
ACTIVE = Gauge("segmentation_change_publisher_active", "1 while this publisher holds the lock and publishes")
FAILURES = Counter("segmentation_change_publisher_failures_total",
                   "Batches not published for now, by what failed (they are retried)", ["stage"])

# The first entries, in order, up to about $1 changes (always the first entry, however large):
# sized by the `changes` column, so entries past the batch are not read out of storage.
FETCH_SQL = f"""
SELECT {', '.join(f'o.{column}' for column in OUTBOX_COLUMNS)}
FROM (SELECT seq, sum(changes) OVER (ORDER BY seq) - changes AS before
      FROM membership_changes_outbox ORDER BY seq LIMIT $2) AS head
JOIN membership_changes_outbox o USING (seq)
WHERE head.before < $1
ORDER BY seq"""
ENTRIES_PER_BATCH = 1_000
DELETE_SQL = "DELETE FROM membership_changes_outbox WHERE seq = ANY($1::bigint[])"


class ChangePublisher:
    def __init__(self, connect: Callable[[], asyncpg.Connection], producer: AIOKafkaProducer, topic: str, *,
                 batch_size: int = 1_000, poll_interval: float = 0.01, standby_retry: float = 1.0,
                 on_published: Callable[[list[float]], None] | None = None) -> None:
        self._connect = connect  # a coroutine function opening a new connection
        self._producer = producer
        self._topic = topic
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._standby_retry = standby_retry
        self._on_published = on_published  # each published change's lag, for benchmarks
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        log.info("publishing membership changes", topic=self._topic, batch_size=self._batch_size)
        backoff = Backoff(5.0)
        standing_by = False
        while not self.stopping.is_set():
            try:
                conn = await self._connect()
            except TRANSIENT_DB_ERRORS as error:
                await self._pause(backoff.next(), "database unavailable, retrying", error)
                continue
            try:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                    if not standing_by:
                        log.info("another publisher is active: standing by")
                    standing_by = True
                    await self._pause(self._standby_retry)
                    continue
                standing_by = False
                log.info("active")
                ACTIVE.set(1)
                backoff.reset()
                await self._publish(conn)
            except TRANSIENT_DB_ERRORS as error:
                FAILURES.labels("database").inc()
                await self._pause(backoff.next(), "database unavailable, retrying", error)
            except asyncpg.UndefinedTableError as error:
                raise SystemExit(f"the database has no membership_changes_outbox ({error}): apply the migrations "
                                 "first (`python -m devstack migrate`, or the `provision` job)") from error
            finally:
                ACTIVE.set(0)
                await _close(conn)
        log.info("stopped")

    async def _publish(self, conn: asyncpg.Connection) -> None:
        backoff = Backoff(5.0)
        while not self.stopping.is_set():
            rows = await conn.fetch(FETCH_SQL, self._batch_size, ENTRIES_PER_BATCH)
            if not rows:
                OLDEST.set(0)
                await self._pause(self._poll_interval)
                continue
            OLDEST.set(max(0.0, time.time() - rows[0]["written_at"].timestamp()))
            changes = [change for row in rows for change in entry_changes(row)]
            try:
                await asyncio.gather(*await send_batched(self._producer, self._topic,
                                                         [record_of(change) for change in changes]))
            except KafkaError as error:  # nothing deleted: the same rows go again
                FAILURES.labels("kafka").inc()
                await self._pause(backoff.next(), "Kafka unavailable, retrying", error)
                continue
            acknowledged = time.time()
            await conn.execute(DELETE_SQL, [row["seq"] for row in rows])
            backoff.reset()
            self._observe(rows, changes, acknowledged)

    def _observe(self, rows: list[asyncpg.Record], changes: list[dict], acknowledged: float) -> None:
        memberships = sum(1 for change in changes if change["kind"] == "membership")
        PUBLISHED.labels("membership").inc(memberships)
        PUBLISHED.labels("rollout").inc(len(changes) - memberships)
        lags = [acknowledged - row["written_at"].timestamp() for row in rows for _ in row["source_ids"]]
        observe_all(LAG, lags)
        if self._on_published:
            self._on_published(lags)

    async def _pause(self, seconds: float, message: str | None = None, error: BaseException | None = None) -> None:
        if message:
            log.warning(message, error=repr(error), retry_in=round(seconds, 3))
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass


async def _close(conn: asyncpg.Connection) -> None:
    """Closing ends the session, and with it the advisory lock."""
    try:
        await asyncio.wait_for(conn.close(), 5)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError):
        conn.terminate()
