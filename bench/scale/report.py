"""The all-users month report at scale: a month with rollout changes of segments covering
millions of users, streamed through the API against COPY of the same explicit rows."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

import asyncpg
import psutil

from bench.read_throughput import serve
from bench.report_stream import copy_seconds, stream_month
from devstack.processes import free_port, stop_process
from services.expiry_worker.partitions import add_months, month_start
from services.query_api.reports import EXPLICIT_COPY_SQL, month_bounds


async def report_month(pool: asyncpg.Pool, slugs: list[str]) -> tuple[int, int]:
    """Last month (seeded with history), with a rollout change of each of `slugs` added to it, as
    the consumer records one (from 0 to 10 %), on days 10, 11, …"""
    first = add_months(month_start(datetime.now(UTC)), -1)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL segmentation.membership_changes = off")
        await conn.execute("DELETE FROM rollout_events WHERE command_id LIKE 'report-%'")  # an earlier run's (--reuse)
        for day, target in enumerate(slugs, start=10):
            await conn.execute(
                """INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason, executed_at,
                                               command_id, overrides_kept)
                   SELECT id, slug, 0, 10, 'percent_changed', $2, $3, false FROM segments WHERE slug = $1""",
                target, first.replace(day=day), f"report-{target}")
    return first.year, first.month


async def report_figures(settings, pool: asyncpg.Pool, year: int, month: int, rounds: int) -> dict:
    """The month's all-users report through the API against COPY of its explicit rows, `rounds`
    alternating rounds: rows a second of each, the API's peak RSS, and the rows."""
    start, end = month_bounds(year, month)
    explicit = await pool.fetchval("SELECT count(*) FROM membership_history WHERE executed_at >= $1 "
                                   "AND executed_at < $2", start, end)
    port = free_port()
    env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", "API_PORT": str(port)}
    api = serve([sys.executable, "-m", "services.query_api", "--workers", "1"], env, port)
    figures: dict = {"api": [], "copy": [], "peak": [], "rows": 0, "explicit": explicit}
    try:
        worker = psutil.Process(api.pid)
        for round_number in range(1, rounds + 1):
            for part in ("copy", "api") if round_number % 2 else ("api", "copy"):
                if part == "copy":
                    figures["copy"].append(explicit / await copy_seconds(pool, EXPLICIT_COPY_SQL, start, end, None))
                else:
                    seconds, lines, peak = await stream_month(port, worker, year, month)
                    figures["rows"] = lines - 1
                    figures["api"].append((lines - 1) / seconds)
                    figures["peak"].append(peak / 2**20)
            print(f"  report round {round_number}/{rounds}: {figures['rows']:,} rows, {figures['api'][-1]:,.0f} "
                  f"rows/s, COPY {figures['copy'][-1]:,.0f} rows/s, peak RSS {figures['peak'][-1]:.0f} MB",
                  file=sys.stderr, flush=True)
    finally:
        stop_process(api)
    return figures
