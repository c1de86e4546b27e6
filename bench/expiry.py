"""Expiry worker: rows/s on a past-due backlog against the limit (one DELETE … RETURNING feeding one
history INSERT), both while the command consumer keeps applying commands to other users, so the
rounds differ only in what removes the backlog; then the lag from expiry to removal at steady
state.

    python -m bench.expiry [--rows 200000] [--batch-size EXPIRY_BATCH_SIZE]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time

import orjson
from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import Progress, bench_environment, paced, percentile, spread
from devstack.processes import stop_process
from services.expiry_worker.worker import ExpiryWorker
from shared.kafka import kafka_options
from shared.settings import Settings

LIMIT_SQL = """
WITH gone AS (DELETE FROM memberships m USING segments s
              WHERE s.id = m.segment_id AND m.expires_at <= now()
              RETURNING m.user_id, s.slug, m.expires_at)
INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
SELECT user_id, slug, 'D', expires_at, 'manual', 'ttl' FROM gone
"""


async def seed_backlog(pool, rows: int) -> None:
    if not await pool.fetchval("SELECT count(*) FROM segments"):
        await pool.execute("INSERT INTO segments (slug, created_at, updated_at) "
                           "SELECT 'SEGMENT_' || g, now(), now() FROM generate_series(0, 49) AS g")
    await pool.execute(
        """INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
           SELECT g, (SELECT min(id) FROM segments) + g % 50, now() - interval '1 hour',
                  now() - interval '1 second' * (g % 600)
           FROM generate_series(1, $1) AS g""", rows)
    await pool.execute("VACUUM ANALYZE memberships")


async def other_users_traffic(settings, rate: int, stop: asyncio.Event) -> int:
    """update_user_segments for users the backlog does not contain, at a steady rate."""
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=5)
    await producer.start()
    sent, rng = 0, random.Random(3)
    try:
        async for _ in paced(rate):
            if stop.is_set():
                break
            user_id = 10_000_000 + rng.randint(1, 100_000)
            command = {"type": "update_user_segments", "user_id": user_id,
                       "add": [f"SEGMENT_{rng.randint(0, 49)}"]}
            await producer.send(settings.assignments_commands_topic, orjson.dumps(command),
                                key=str(user_id).encode())
            sent += 1
    finally:
        await producer.stop()
    return sent


async def drain(pool, batch_size: int, concurrency: int, total: int) -> float:
    worker = ExpiryWorker(pool, batch_size, max_sleep_seconds=0.05, concurrency=concurrency)
    removed = 0
    progress = Progress("expiring", total)

    def count(result):
        nonlocal removed
        removed += result.removed
        progress.update(removed)
        if removed >= total:
            worker.stop()

    worker.on_batch = count
    started = time.monotonic()
    await worker.run()
    return total / (time.monotonic() - started)


async def steady_lag(pool, per_second: int, seconds: int) -> list[float]:
    await pool.execute(
        """INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
           SELECT 20000000 + g, (SELECT min(id) FROM segments), now(),
                  now() + interval '2 seconds' + interval '1 second' * (g::float8 / $1::int)
           FROM generate_series(1, $1::int * $2::int) AS g""", per_second, seconds)
    lags: list[float] = []
    worker = ExpiryWorker(pool, batch_size=1000, max_sleep_seconds=1.0, on_batch=lambda r: lags.extend(r.lags))
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(seconds + 4)
    worker.stop()
    await task
    return lags


@contextlib.asynccontextmanager
async def consumer_traffic(settings, pool, rate: int):
    """The command consumer as its own process, applying `rate` commands/s to users the backlog
    does not contain; yields a function returning how many outcomes it has stored so far.
    `rate` 0: nothing runs beside the benchmark."""
    if rate <= 0:
        async def none() -> int:
            return 0

        yield none
        return
    env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING"}
    consumer = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "services.command_consumer"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = asyncio.Event()
    traffic = asyncio.create_task(other_users_traffic(settings, rate, stop))
    try:
        await asyncio.sleep(6)  # the consumer joins its group and is applying commands
        yield lambda: pool.fetchval("SELECT count(*) FROM command_outcomes")
    finally:
        stop.set()
        await traffic
        await asyncio.to_thread(stop_process, consumer)


async def worker_round(new, args, label: str) -> tuple[float, int]:
    """The worker draining a backlog while the consumer applies commands to other users: rows/s,
    and the commands applied meanwhile."""
    settings, pool = await new(label)
    await seed_backlog(pool, args.rows)
    async with consumer_traffic(settings, pool, args.command_rate) as applied:
        applied_before = await applied()
        rate = await drain(pool, args.batch_size, args.concurrency, args.rows)
        applied_during = await applied() - applied_before
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id < 10000000") == 0
    return rate, applied_during


async def limit_round(new, args, label: str) -> float:
    """The same backlog removed by one DELETE … RETURNING into one INSERT, under the same
    traffic: the consumer applying commands to other users meanwhile."""
    settings, pool = await new(label)
    await seed_backlog(pool, args.rows)
    async with consumer_traffic(settings, pool, args.command_rate):
        started = time.monotonic()
        await pool.execute(LIMIT_SQL)
        rate = args.rows / (time.monotonic() - started)
    return rate


async def main(args) -> None:
    async with bench_environment("expiry") as (_infra, new):
        workers, limits, applied = [], [], []
        # Rounds pair the worker with the limit, alternating which goes first.
        for round_number in range(1, args.rounds + 1):
            order = ("worker", "limit") if round_number % 2 else ("limit", "worker")
            for part in order:
                if part == "worker":
                    rate, during = await worker_round(new, args, f"worker{round_number}")
                    workers.append(rate)
                    applied.append(during)
                else:
                    limits.append(await limit_round(new, args, f"limit{round_number}"))
            print(f"  round {round_number}/{args.rounds}: worker {workers[-1]:,.0f} rows/s, limit {limits[-1]:,.0f} "
                  f"rows/s, {workers[-1] / limits[-1]:.0%}", file=sys.stderr, flush=True)
        _, pool = await new("lag")
        await seed_backlog(pool, 0)  # the segments, no backlog
        lags = await steady_lag(pool, args.steady_rate, args.steady_seconds)

    ratios = [worker / limit for worker, limit in zip(workers, limits, strict=True)]
    common.report(f"expiry of {args.rows:,} past-due memberships (batch {args.batch_size:,}, "
                  f"{args.concurrency} connections)", {
        "worker": f"{spread(workers)} rows/s  (the consumer applied {statistics.median(applied):,.0f} other "
                  "commands meanwhile, median)",
        "limit": f"{spread(limits)} rows/s  (one DELETE … RETURNING into one INSERT, the same traffic)",
        "ratio": f"{spread(ratios, '{:.0%}')}   (target >= 50% in every round: lowest {min(ratios):.0%})",
        "steady lag": f"p50 {percentile(lags, 0.5):.3f} s, p99 {percentile(lags, 0.99):.3f} s over "
                      f"{len(lags):,} expiries at {args.steady_rate}/s (target p99 <= 2 s)",
    })


def cli() -> None:
    defaults = Settings(_env_file=None)
    common.cli(__doc__, main, rows=200_000, batch_size=defaults.expiry_batch_size,
               concurrency=defaults.expiry_concurrency,
               command_rate=(1000, "commands/s to other users meanwhile, in both kinds of round (0: none)"),
               steady_rate=(500, "expiries per second in the lag phase"), steady_seconds=15,
               rounds=(3, "rounds pairing the worker with the limit"))


if __name__ == "__main__":
    cli()
