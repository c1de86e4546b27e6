"""Partition maintenance (README: "Data that stays bounded"), run by the expiry worker.

Two tables are partitioned by time (migrations/0005): `membership_history` by month of
`executed_at`, and the outcome inbox `command_outcomes` by `recorded_at` (the command record's
timestamp) in intervals of OUTCOME_PARTITION_INTERVAL. Each has a DEFAULT partition, so a write
whose range has no partition yet still succeeds. Every PARTITION_MAINTENANCE_INTERVAL this:

- makes the coming ranges' partitions ahead of need (never on the write path): a new one is
  made detached, gets any rows the default partition holds for its range, and is attached, so
  the default partition is left with nothing of a range that has a partition;
- drops whole partitions past retention: history months before HISTORY_RETENTION_MONTHS (with
  their rollout events), inbox partitions whose records are all older than OUTCOME_RETENTION
  plus one interval (a margin for clocks that differ between the consumer and this worker), and
  records how far back each table still holds data (`retention_horizon`, read by the API).

Any number of workers may run: a session advisory lock lets one maintain at a time. DDL waits at
most LOCK_TIMEOUT for its locks (a long report holds the history table): it gives up rather than
queue every writer behind it, and the next run tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, Histogram

from services.expiry_worker.partition_ranges import (
    EPOCH,
    HISTORY,
    OUTCOMES,
    Partition,
    Table,
    add_months,
    history_partition_name,
    interval_ranges,
    month_ranges,
    month_start,
    outcome_partition_name,
    parse_bound,
)
from shared.db import TRANSIENT_DB_ERRORS, writable
from shared.settings import RetentionSettings

log = structlog.get_logger("partitions")

PARTITIONS = Gauge("segmentation_partitions", "Partitions of a partitioned table (its default one excluded)",
                   ["table"])
OLDEST = Gauge("segmentation_partition_oldest_seconds",
               "Start of the oldest range a table still holds (Unix time; the upper bound of a partition "
               "open below)", ["table"])
AHEAD = Gauge("segmentation_partition_ahead_seconds",
              "How far past now the newest partition of a table reaches (partitions made ahead of need)", ["table"])
RETENTION = Gauge("segmentation_partition_retention_seconds",
                  "How long a table keeps data (OUTCOME_RETENTION, HISTORY_RETENTION_MONTHS); absent when kept "
                  "for ever", ["table"])
DEFAULT_ROWS = Gauge("segmentation_partition_default_rows",
                     "Rows in a table's default partition: written where no partition was ready (0 normally)",
                     ["table"])
ROWS_DROPPED = Counter("segmentation_partition_rows_dropped_total", "Rows removed past retention, by table",
                       ["table"])
CREATED = Counter("segmentation_partitions_created_total", "Partitions made ahead, by table", ["table"])
DROPPED = Counter("segmentation_partitions_dropped_total", "Partitions dropped past retention, by table", ["table"])
FAILURES = Counter("segmentation_partition_maintenance_failures_total",
                   "Maintenance runs that failed (lock timeout, database away); the next run retries")
DURATION = Histogram("segmentation_partition_maintenance_seconds", "Duration of one maintenance run")

LOCK_TIMEOUT = "5s"
ADVISORY_LOCK = 7_362_912_001  # one maintainer at a time, whatever the number of workers


# --- the database --------------------------------------------------------------------------------

async def partitions(conn: asyncpg.Connection, table: Table) -> list[Partition]:
    """The table's range partitions, oldest first (its default one left out)."""
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::regclass""", table.name)
    found = []
    for row in rows:
        bound = parse_bound(row["bound"])
        if bound is not None:
            found.append(Partition(row["relname"], *bound))
    return sorted(found, key=lambda p: (p.lower is not None, p.lower or EPOCH))


async def create_partition(conn: asyncpg.Connection, table: Table, name: str, lower: datetime,
                           upper: datetime) -> int:
    """A partition for [lower, upper), with the rows the default partition held for it; how many
    it took from there. Made detached and then attached: attaching locks the parent only against
    other DDL, never against writers."""
    ident, key = _quote(name), _quote(table.key)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"CREATE TABLE {ident} (LIKE {_quote(table.name)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        # Its rows are in range by construction: with this check in place, attaching skips the scan.
        await conn.execute(f"ALTER TABLE {ident} ADD CONSTRAINT {_quote(name + '_range')} "
                           f"CHECK ({key} >= '{lower.isoformat()}' AND {key} < '{upper.isoformat()}')")
        status = await conn.execute(
            f"WITH moved AS (DELETE FROM {_quote(table.default)} WHERE {key} >= $1 AND {key} < $2 RETURNING *) "
            f"INSERT INTO {ident} SELECT * FROM moved", lower, upper)
        await conn.execute(f"ALTER TABLE {_quote(table.name)} ATTACH PARTITION {ident} "
                           f"FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')")
        await conn.execute(f"ALTER TABLE {ident} DROP CONSTRAINT {_quote(name + '_range')}")
    return int(status.split()[-1])


async def drop_partition(conn: asyncpg.Connection, table: Table, partition: Partition) -> int:
    """Detach and drop a whole partition (no row is deleted one by one); the rows it held."""
    ident = _quote(partition.name)
    rows = await conn.fetchval(f"SELECT count(*) FROM {ident}")
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"ALTER TABLE {_quote(table.name)} DETACH PARTITION {ident}")
        await conn.execute(f"DROP TABLE {ident}")
    return rows


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass
class MaintenanceRun:
    """What one run did, for logs and tests."""

    created: dict[str, list[str]] = field(default_factory=lambda: {HISTORY.name: [], OUTCOMES.name: []})
    dropped: dict[str, list[str]] = field(default_factory=lambda: {HISTORY.name: [], OUTCOMES.name: []})
    rows_moved: int = 0  # out of default partitions into new ones
    rows_dropped: dict[str, int] = field(default_factory=lambda: {HISTORY.name: 0, OUTCOMES.name: 0})
    skipped: bool = False  # another worker was maintaining


class PartitionMaintainer:
    def __init__(self, pool: asyncpg.Pool, settings: RetentionSettings,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._pool = pool
        self._settings = settings
        self._clock = clock
        RETENTION.labels(OUTCOMES.name).set(settings.outcome_retention)
        if settings.history_retention_months:  # whole months, as retention drops them: 31 days each
            RETENTION.labels(HISTORY.name).set(settings.history_retention_months * 31 * 86_400)

    async def run_once(self) -> MaintenanceRun:
        started = time.monotonic()
        run = MaintenanceRun()
        async with writable(self._pool) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK):
                run.skipped = True
                return run
            try:
                await conn.execute("SET TimeZone = 'UTC'")  # partition bounds print in UTC
                now = self._clock()
                await self._history(conn, now, run)
                await self._outcomes(conn, now, run)
                await self._report(conn)
            finally:
                await conn.execute("RESET TimeZone")
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK)
        DURATION.observe(time.monotonic() - started)
        if any(run.created.values()) or any(run.dropped.values()) or run.rows_moved:
            log.info("partitions maintained", created=run.created, dropped=run.dropped, rows_moved=run.rows_moved,
                     rows_dropped=run.rows_dropped)
        return run

    async def run(self, stopping: asyncio.Event) -> None:
        """run_once now and every PARTITION_MAINTENANCE_INTERVAL until `stopping` is set; a failed
        run is logged and counted, and tried again sooner."""
        interval = self._settings.partition_maintenance_interval
        while not stopping.is_set():
            wait = interval
            try:
                await self.run_once()
            except (*TRANSIENT_DB_ERRORS, asyncpg.LockNotAvailableError, asyncpg.PostgresError) as error:
                FAILURES.inc()
                wait = min(interval, 30)
                log.warning("partition maintenance failed, will retry", error=repr(error), retry_in=wait)
            try:
                await asyncio.wait_for(stopping.wait(), wait)
            except TimeoutError:
                pass

    async def _history(self, conn: asyncpg.Connection, now: datetime, run: MaintenanceRun) -> None:
        settings = self._settings
        existing = await partitions(conn, HISTORY)
        last_upper = max((p.upper for p in existing if p.upper is not None), default=None)
        horizon = (add_months(month_start(now), -settings.history_retention_months)
                   if settings.history_retention_months else None)
        start = last_upper or month_start(now)
        if horizon is not None:
            start = max(start, horizon)
        for lower, upper in month_ranges(start, add_months(month_start(now), settings.history_partitions_ahead)):
            if lower < start:
                continue
            name = history_partition_name(lower)
            run.rows_moved += await create_partition(conn, HISTORY, name, lower, upper)
            run.created[HISTORY.name].append(name)
            CREATED.labels(HISTORY.name).inc()
        if horizon is None:
            return
        for partition in existing:
            if partition.upper is not None and partition.upper <= horizon:
                await self._drop(conn, HISTORY, partition, run)
        # What else the gone months held: rows written where no partition was (default), and the
        # rollout events (small, not partitioned: README) with the overrides of each, and the
        # spans of explicit rows that ended before any kept event.
        dropped = await conn.fetchval(f"WITH gone AS (DELETE FROM {HISTORY.default} WHERE executed_at < $1 "
                                      "RETURNING 1) SELECT count(*) FROM gone", horizon)
        async with conn.transaction():
            await conn.execute("""DELETE FROM rollout_event_overrides o USING rollout_events e
                                  WHERE o.event_id = e.id AND e.executed_at < $1""", horizon)
            await conn.execute("DELETE FROM rollout_events WHERE executed_at < $1", horizon)
            await conn.execute("DELETE FROM explicit_spans WHERE ended < $1", horizon)
            await conn.execute(
                """INSERT INTO retention_horizon (table_name, dropped_before) VALUES ($1, $2)
                   ON CONFLICT (table_name) DO UPDATE
                   SET dropped_before = GREATEST(retention_horizon.dropped_before, EXCLUDED.dropped_before)""",
                HISTORY.name, horizon)
        self._count_dropped(HISTORY, dropped, run)

    async def _outcomes(self, conn: asyncpg.Connection, now: datetime, run: MaintenanceRun) -> None:
        settings = self._settings
        interval = timedelta(seconds=settings.outcome_partition_interval)
        window = timedelta(seconds=settings.outcome_retention)
        existing = await partitions(conn, OUTCOMES)
        last_upper = max((p.upper for p in existing if p.upper is not None), default=None)
        # Nothing older than the window is ever looked up again (the consumer rejects such records
        # too_old), so no partition is made for it, however long the service was away.
        start = max(last_upper or EPOCH, now - window)
        for lower, upper in interval_ranges(start, now + interval * settings.outcome_partitions_ahead,
                                            settings.outcome_partition_interval):
            name = outcome_partition_name(lower)
            run.rows_moved += await create_partition(conn, OUTCOMES, name, lower, upper)
            run.created[OUTCOMES.name].append(name)
            CREATED.labels(OUTCOMES.name).inc()
        # One interval of margin past the window: the consumer's clock and this one may differ.
        horizon = now - window - interval
        for partition in existing:
            if partition.upper is not None and partition.upper <= horizon:
                await self._drop(conn, OUTCOMES, partition, run)
        dropped = await conn.fetchval(f"WITH gone AS (DELETE FROM {OUTCOMES.default} WHERE recorded_at < $1 "
                                      "RETURNING 1) SELECT count(*) FROM gone", horizon)
        self._count_dropped(OUTCOMES, dropped, run)

    async def _drop(self, conn: asyncpg.Connection, table: Table, partition: Partition, run: MaintenanceRun) -> None:
        rows = await drop_partition(conn, table, partition)
        run.dropped[table.name].append(partition.name)
        DROPPED.labels(table.name).inc()
        self._count_dropped(table, rows, run)

    @staticmethod
    def _count_dropped(table: Table, rows: int, run: MaintenanceRun) -> None:
        run.rows_dropped[table.name] += rows
        ROWS_DROPPED.labels(table.name).inc(rows)

    async def _report(self, conn: asyncpg.Connection) -> None:
        for table in (HISTORY, OUTCOMES):
            existing = await partitions(conn, table)
            PARTITIONS.labels(table.name).set(len(existing))
            if existing:
                oldest, newest = existing[0], existing[-1]
                OLDEST.labels(table.name).set((oldest.lower or oldest.upper).timestamp())
                if newest.upper is not None:
                    AHEAD.labels(table.name).set((newest.upper - self._clock()).total_seconds())
            DEFAULT_ROWS.labels(table.name).set(await conn.fetchval(f"SELECT count(*) FROM {table.default}"))
