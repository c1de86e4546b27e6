"""History partitioned by month: a month's all-users report from a history holding only that month
against one holding 24 months of the same size, side by side in one run; dropping a whole month of
1,000,000 rows past retention; and how fast the partitioning migration moves an existing
database's rows (it holds its tables locked meanwhile).

    python -m bench.history_partitions [--rows-per-month 200000] [--months 24] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from bench import common
from bench.common import Progress, bench_environment, spread
from devstack.infra import fresh_database
from services.expiry_worker.partitions import (
    HISTORY,
    Partition,
    add_months,
    create_partition,
    drop_partition,
    history_partition_name,
)
from services.query_api.reports import stream_report
from shared.db import apply_migrations

PARTITIONING = "0005_partitioned_history_and_inbox"

REPORTED = datetime(2024, 12, 1, tzinfo=UTC)  # the month whose report is timed: the newest of the 24


async def seed_months(pool, months: list[datetime], rows: int, label: str) -> None:
    progress = Progress(f"seeding {label}", len(months) * rows)
    async with pool.acquire() as conn:
        for index, lower in enumerate(months):
            await create_partition(conn, HISTORY, history_partition_name(lower), lower, add_months(lower, 1))
            # Each month alike: `rows` entries and exits spread over its days, users and segments.
            await conn.execute(
                """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
                   SELECT g % 50000 + 1, 'SEGMENT_' || (g % 100), CASE WHEN g % 4 = 0 THEN 'D' ELSE 'I' END,
                          $1::timestamptz + (g % 2419200) * interval '1 second', 'manual', 'manual'
                   FROM generate_series(1, $2) AS g""", lower, rows)
            progress.update((index + 1) * rows)
        await conn.execute("VACUUM ANALYZE membership_history")
        await conn.execute("CHECKPOINT")


async def time_report(pool, year: int, month: int) -> tuple[float, int]:
    """Seconds to stream the month's all-users CSV to the end, and its lines."""
    async with pool.acquire() as conn:
        started = time.perf_counter()
        lines = 0
        async for chunk in stream_report(conn, year, month, None, release=_nothing):
            lines += chunk.count(b"\n")
        return time.perf_counter() - started, lines


async def _nothing() -> None:
    return None


async def main(args) -> None:
    async with bench_environment("history") as (infra, new):
        _, one = await new("one_month")
        await seed_months(one, [REPORTED], args.rows_per_month, "1 month")
        _, many = await new("many_months")
        months = [add_months(REPORTED, -index) for index in reversed(range(args.months))]
        await seed_months(many, months, args.rows_per_month, f"{args.months} months")

        timings: dict[str, list[float]] = {"1 month": [], f"{args.months} months": []}
        await time_report(one, REPORTED.year, REPORTED.month)  # warm both caches alike
        await time_report(many, REPORTED.year, REPORTED.month)
        for round_number in range(1, args.rounds + 1):
            order = [("1 month", one), (f"{args.months} months", many)]
            for label, pool in order if round_number % 2 else reversed(order):
                seconds, lines = await time_report(pool, REPORTED.year, REPORTED.month)
                timings[label].append(seconds)
                print(f"  round {round_number}/{args.rounds}: {label}: {seconds:.2f} s for {lines:,} lines",
                      file=sys.stderr, flush=True)
        ratios = [many_s / one_s for one_s, many_s in zip(*timings.values(), strict=True)]

        # Dropping a month of `drop_rows` rows: whole partitions, detached and dropped.
        _, dropping = await new("drop")
        drop_months = [datetime(2020, month, 1, tzinfo=UTC) for month in range(1, args.rounds + 1)]
        await seed_months(dropping, drop_months, args.drop_rows, f"{args.rounds} months to drop")
        drops = []
        async with dropping.acquire() as conn:
            for lower in drop_months:
                started = time.perf_counter()
                rows = await drop_partition(conn, HISTORY, Partition(history_partition_name(lower), lower,
                                                                     add_months(lower, 1)))
                drops.append(time.perf_counter() - started)
                print(f"  dropped {rows:,} rows in {drops[-1]:.3f} s", file=sys.stderr, flush=True)

        migrated_rows, migration_seconds = await time_migration(infra, args.migration_rows)

    label_many = f"{args.months} months"
    common.report(
        f"history by month ({args.rows_per_month:,} rows a month; the all-users report of "
        f"{REPORTED:%Y-%m}, streamed to the end)", {
            "history of 1 month": f"{spread(timings['1 month'], '{:.2f}')} s",
            f"history of {label_many}": f"{spread(timings[label_many], '{:.2f}')} s",
            f"{label_many} / 1 month": f"{spread(ratios, '{:.2f}')}x   (target <= 1.2)",
            f"drop a month of {args.drop_rows:,} rows": f"{spread(drops, '{:.3f}')} s   (target < 1 s; count of its "
                                                        f"rows for the metric included; median "
                                                        f"{statistics.median(drops) * 1000:.0f} ms)",
            "partitioning migration": f"{migrated_rows:,} rows in {migration_seconds:.1f} s = "
                                      f"{migrated_rows / migration_seconds:,.0f} rows/s (tables locked meanwhile)",
        })


async def time_migration(infra, rows: int) -> tuple[int, float]:
    """A database at the schema before partitioning, holding `rows` history rows and half as many
    outcomes over 12 months, migrated: the seconds the migration took."""
    url = await fresh_database(infra.database_url, f"bench_history_migration_{uuid.uuid4().hex[:6]}",
                               migrated_before=PARTITIONING)
    conn = await asyncpg.connect(url)
    try:
        print(f"  seeding {rows:,} history rows and {rows // 2:,} outcomes at the old schema…", file=sys.stderr,
              flush=True)
        await conn.execute(
            """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
               SELECT g % 50000 + 1, 'SEGMENT_' || (g % 100), 'I',
                      '2024-01-01'::timestamptz + (g % 31536000) * interval '1 second', 'manual', 'manual'
               FROM generate_series(1, $1) AS g""", rows)
        await conn.execute(
            """INSERT INTO command_outcomes (command_id, type, status, processed_at, source_topic, source_partition,
                                             source_offset)
               SELECT 'c-' || g, 'create_user', 'applied', '2024-01-01'::timestamptz + g * interval '1 second',
                      'a', 0, g
               FROM generate_series(1, $1) AS g""", rows // 2)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    started = time.perf_counter()
    await asyncio.to_thread(apply_migrations, url)
    return rows + rows // 2, time.perf_counter() - started


def cli() -> None:
    common.cli(__doc__, main, rows_per_month=200_000, months=24, rounds=3,
               drop_rows=(1_000_000, "rows in each month dropped"),
               migration_rows=(2_000_000, "history rows of the database the migration is timed on"))


if __name__ == "__main__":
    cli()
