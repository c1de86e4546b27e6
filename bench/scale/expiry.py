"""A mass expiry at scale: memberships due in the same minute, removed by the expiry worker
(its own process) and by the one-statement limit, with the hot read timed meanwhile."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from bench.common import Progress
from bench.expiry import LIMIT_SQL
from bench.scale.data import percent_rank, slug
from bench.scale.reads import reads_p99
from devstack.processes import free_port, stop_process
from shared.db import create_pool
from shared.settings import Settings

EXPIRING_TABLE = "bench_expiring"


async def set_aside(pool: asyncpg.Pool, count: int, first_rank: int) -> None:
    """`count` memberships of segments without a rollout, from rank `first_rank` on, moved into
    a table of their own (without history: this is the data set, not the service's work), to be
    put back due round after round."""
    await put_back(pool)  # by a run stopped midway
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL segmentation.membership_changes = off")
        await conn.execute(f"CREATE TABLE {EXPIRING_TABLE} (user_id bigint, segment_id bigint, added_at timestamptz)")
        await conn.execute(f"""INSERT INTO {EXPIRING_TABLE}
                               SELECT m.user_id, m.segment_id, m.added_at FROM memberships m
                               JOIN segments s ON s.id = m.segment_id
                               WHERE s.slug >= $1 AND s.percent = 0 AND m.expires_at IS NULL LIMIT $2""",
                           slug(first_rank), count)
        await conn.execute(f"DELETE FROM memberships m USING {EXPIRING_TABLE} e "
                           "WHERE m.user_id = e.user_id AND m.segment_id = e.segment_id")


async def put_back(pool: asyncpg.Pool) -> None:
    """The set-aside memberships where they were, without an expiry, and their table gone."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT to_regclass($1) IS NULL", EXPIRING_TABLE):
            return
        await conn.execute("SET LOCAL segmentation.membership_changes = off")
        await conn.execute(f"INSERT INTO memberships (user_id, segment_id, added_at) SELECT user_id, segment_id, "
                           f"added_at FROM {EXPIRING_TABLE} ON CONFLICT DO NOTHING")
        await conn.execute(f"DROP TABLE {EXPIRING_TABLE}")


async def put_back_due(pool: asyncpg.Pool) -> int:
    """The set-aside memberships again, each due at a moment of the last minute."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL segmentation.membership_changes = off")
        status = await conn.execute(f"""INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
                                        SELECT user_id, segment_id, added_at, now() - random() * interval '1 minute'
                                        FROM {EXPIRING_TABLE}""")
    await pool.execute("CHECKPOINT")  # the insert's pages written now, not during the round
    return int(status.split()[-1])


async def worker_drain(settings: Settings, due: int, draining: asyncio.Event) -> float:
    """The expiry worker as its own process, as it runs in production (its configured batch and
    connections), removing `due` memberships: rows a second from its start (its /metrics port
    answering, when `draining` is set) to its counter of removed rows reaching `due`. A worker
    starts once, not once a wave of expiries, so its start-up (the interpreter loading its
    modules) is not part of the drain."""
    metrics_port = free_port()
    env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", "EXPIRY_METRICS_PORT": str(metrics_port)}
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "services.expiry_worker"], env=env, stdout=subprocess.DEVNULL)
    progress = Progress("expiring", due)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{metrics_port}") as session:
            started = None
            while True:
                if worker.poll() is not None:
                    raise RuntimeError(f"the expiry worker exited ({worker.returncode}) during the drain")
                try:
                    async with session.get("/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
                    continue
                if started is None:
                    started = time.monotonic()
                    draining.set()
                removed = sum(sample.value for family in text_string_to_metric_families(text)
                              for sample in family.samples if sample.name == "segmentation_memberships_expired_total")
                progress.update(int(removed))
                if removed >= due:
                    return due / (time.monotonic() - started)
                await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(stop_process, worker)


async def expiry(settings: Settings, pool: asyncpg.Pool, port: int, users: int, args) -> dict[str, list[float]]:
    """Rounds of the due memberships removed by the worker (reads timed meanwhile) and by the
    limit statement, in alternating order, and of the reads alone."""
    # Statements of a million rows outlast the pool's command timeout: they run on one without.
    bulk = await create_pool(settings.database_url, min_size=1, max_size=1, command_timeout=None)
    try:
        await set_aside(bulk, args.expiring, percent_rank(args.rounds) + 1)
        try:
            return await expiry_rounds(settings, pool, bulk, port, users, args)
        finally:
            await put_back(bulk)
    finally:
        await bulk.close()


async def expiry_rounds(settings: Settings, pool: asyncpg.Pool, bulk: asyncpg.Pool, port: int, users: int,
                        args) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"worker": [], "limit": [], "during": [], "idle": []}
    for round_number in range(1, args.rounds + 1):
        order = ("worker", "limit") if round_number % 2 else ("limit", "worker")
        for part in order:
            due = await put_back_due(bulk)
            if part == "worker":
                idle, _ = await reads_p99(port, users, args.read_rate, asyncio.sleep(args.duration))
                figures["idle"].append(idle)
                draining = asyncio.Event()
                p99, rate = await reads_p99(port, users, args.read_rate, worker_drain(settings, due, draining),
                                            draining)
                figures["worker"].append(rate)
                figures["during"].append(p99)
            else:
                started = time.monotonic()
                await bulk.execute(LIMIT_SQL)
                figures["limit"].append(due / (time.monotonic() - started))
        print(f"  expiry round {round_number}/{args.rounds}: worker {figures['worker'][-1]:,.0f} rows/s, limit "
              f"{figures['limit'][-1]:,.0f} rows/s; read p99 {figures['during'][-1]:.1f} ms draining, "
              f"{figures['idle'][-1]:.1f} ms idle", file=sys.stderr, flush=True)
    return figures
