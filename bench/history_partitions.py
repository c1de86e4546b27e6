"""History partitioned by month: a month's all-users report from a history holding only that month
against one holding 24 months of the same size, side by side in one run; and dropping a whole
month of 1,000,000 rows past retention.

    python -m bench.history_partitions [--rows-per-month 200000] [--months 24] [--rounds 3]
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import UTC, datetime

from bench import common
from bench.common import Progress, bench_environment, spread
from services.expiry_worker.partitions import (
    HISTORY,
    Partition,
    add_months,
    create_partition,
    drop_partition,
    history_partition_name,
)
from services.query_api.reports import stream_report

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
                          $1 + (g % 2419200) * interval '1 second', 'manual', 'manual'
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
    async with bench_environment("history") as (_infra, new):
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
        })


def cli() -> None:
    common.cli(__doc__, main, rows_per_month=200_000, months=24, rounds=3,
               drop_rows=(1_000_000, "rows in each month dropped"))


if __name__ == "__main__":
    cli()
