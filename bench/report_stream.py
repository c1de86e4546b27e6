"""Streaming a 1,000,000-row history CSV through the API against PostgreSQL's own
COPY … TO STDOUT of the same rows, with the API process's peak memory.

    python -m bench.report_stream [--rows 1000000]
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime

import httpx
import psutil

from bench import common
from bench.common import bench_environment, spread
from bench.read_throughput import serve
from devstack.processes import free_port, stop_process
from services.expiry_worker.partitions import HISTORY, add_months, create_partition, history_partition_name

COPY_QUERY = """SELECT user_id, segment_slug, operation,
                       to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), source, reason
                FROM membership_history WHERE executed_at >= '2023-09-01' AND executed_at < '2023-10-01'
                ORDER BY executed_at, user_id, segment_slug"""


MONTH = datetime(2023, 9, 1, tzinfo=UTC)


class Sink:
    def __init__(self) -> None:
        self.bytes = 0

    async def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)


async def main(args) -> None:
    async with bench_environment("reports") as (_infra, new):
        settings, pool = await new("history")
        print(f"  seeding {args.rows:,} history rows…", file=sys.stderr, flush=True)
        async with pool.acquire() as conn:  # the month's partition, as the expiry worker would have made it
            await create_partition(conn, HISTORY, history_partition_name(MONTH), MONTH, add_months(MONTH, 1))
        await pool.execute(
            """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
               SELECT 1 + g % 200000, 'SEGMENT_' || (g % 100), CASE WHEN g % 3 = 0 THEN 'D' ELSE 'I' END,
                      '2023-09-01'::timestamptz + g * interval '2 seconds', 'manual', 'manual'
               FROM generate_series(1, $1) AS g""", args.rows)
        await pool.execute("VACUUM ANALYZE membership_history")

        port = free_port()
        env = {**os.environ, **settings.to_env(), "API_PORT": str(port), "LOG_LEVEL": "WARNING"}
        api = serve([sys.executable, "-m", "services.query_api", "--workers", "1"], env, port)
        copy_rates, api_rates, peaks = [], [], []
        try:
            worker = psutil.Process(api.pid)
            idle_rss = worker.memory_info().rss
            for round_number in range(1, args.rounds + 1):
                # Alternate which goes first, so drift on the machine affects both alike.
                for part in ("copy", "api") if round_number % 2 else ("api", "copy"):
                    print(f"  round {round_number}/{args.rounds}: {part}…", file=sys.stderr, flush=True)
                    if part == "copy":
                        copy_rates.append(args.rows / await copy_seconds(pool))
                    else:
                        seconds, peak = await api_seconds(port, worker, args.rows)
                        api_rates.append(args.rows / seconds)
                        peaks.append(peak)
        finally:
            stop_process(api)
    ratios = [api / copy for api, copy in zip(api_rates, copy_rates, strict=True)]
    common.report(f"history report of {args.rows:,} rows (one month, all users), {args.rounds} alternating rounds", {
        "API stream": f"{spread(api_rates)} rows/s",
        "COPY TO STDOUT": f"{spread(copy_rates)} rows/s  (the same rows, formatted by PostgreSQL)",
        "ratio": f"{spread(ratios, '{:.0%}')}   (target >= 50%)",
        "API RSS": f"{idle_rss / 2**20:.0f} MB idle, peak while streaming "
                   f"{spread([peak / 2**20 for peak in peaks], '{:.0f}')} MB (target < 150 MB)",
    })


async def copy_seconds(pool, query: str = COPY_QUERY, *args) -> float:
    """The limit: the database writing the same CSV itself."""
    async with pool.acquire() as conn:
        sink = Sink()
        started = time.monotonic()
        await conn.copy_from_query(query, *args, output=sink.write, format="csv", header=True)
        return time.monotonic() - started


async def api_seconds(port: int, worker: psutil.Process, rows: int) -> tuple[float, int]:
    """Seconds to stream the month's CSV through the API, and the API's peak RSS meanwhile."""
    seconds, lines, peak_rss = await stream_month(port, worker, MONTH.year, MONTH.month)
    if lines != rows + 1:
        raise SystemExit(f"the report had {lines - 1:,} rows, not {rows:,}")
    return seconds, peak_rss


async def stream_month(port: int, worker: psutil.Process, year: int, month: int) -> tuple[float, int, int]:
    """Seconds to stream a month's all-users CSV through the API, its lines (header included),
    and the API process's peak RSS meanwhile."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as http:
        link = (await http.get("/reports/history", params={"year": year, "month": month})).json()["report_link"]
        peak_rss, lines = worker.memory_info().rss, 0
        started = time.monotonic()
        async with http.stream("GET", link) as response:
            async for chunk in response.aiter_bytes():
                lines += chunk.count(b"\n")
                peak_rss = max(peak_rss, worker.memory_info().rss)
        return time.monotonic() - started, lines, peak_rss


def cli() -> None:
    common.cli(__doc__, main, rows=1_000_000, rounds=3)


if __name__ == "__main__":
    cli()
