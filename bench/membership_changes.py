"""The membership-changes stream: commit-to-publish latency at a steady rate of changes, and what
publishing costs the writers: the command consumer's throughput and the expiry worker's rate with
the stream on, as a ratio of the same run with it off (`segmentation.membership_changes = off`
for the database). "On" is measured twice: the outbox filled with no publisher running (the
cost in the writers' own transactions), and with the publisher running as its own process on the
same machine (adding its CPU, and the broker's, to the same cores). Same broker, same database
server, same run; the rounds rotate which goes first.

    python -m bench.membership_changes [--rate 500] [--seconds 20] [--commands 100000] [--rows 200000]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import bench_environment, paced, percentile, spread
from bench.consumer_workload import (
    consume_all,
    consumed_counter,
    consumer_process,
    generate,
    measure_until_stored,
    preload,
    seed_segments,
)
from bench.expiry import drain, seed_backlog
from devstack.processes import stop_process
from services.change_publisher.publisher import ChangePublisher
from services.command_consumer.repository import open_pool
from shared.kafka import create_producer, kafka_options
from shared.service import tune_gc


async def switch(pool, on: bool) -> None:
    """The stream on or off for the database: sessions opened after this follow."""
    database = await pool.fetchval("SELECT current_database()")
    await pool.execute(f'ALTER DATABASE "{database}" SET segmentation.membership_changes = '
                       f"{'on' if on else 'off'}")


OFF, OUTBOX, ON = "off", "outbox only", "on"
MODES = (OFF, OUTBOX, ON)


@contextlib.asynccontextmanager
async def publisher_process(settings, on: bool):
    """`python -m services.change_publisher` while the block runs, when `on`."""
    if not on:
        yield
        return
    env = {**os.environ, **settings.to_env(), "PUBLISHER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "services.change_publisher"], env=env,  # noqa: ASYNC220
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        await asyncio.to_thread(stop_process, process)


async def drained(pool, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while await pool.fetchval("SELECT count(*) FROM membership_changes_outbox"):
        if time.monotonic() > deadline:
            raise RuntimeError("the publisher did not drain the outbox")
        await asyncio.sleep(0.1)


async def latency_round(new, args, label: str) -> tuple[list[float], int]:
    """Changes at `args.rate` a second through the whole path (commands, the consumer as its own
    process, the outbox, the publisher in this process); each change's time from its write in its
    transaction (before the commit, so the figure is an upper bound) to the broker's
    acknowledgement of its event."""
    settings, pool = await new(label)
    await seed_segments(pool, 50)
    lags: list[float] = []
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=1)
    publishing = create_producer(settings)
    await producer.start()
    await publishing.start()
    publisher = ChangePublisher(functools.partial(asyncpg.connect, settings.database_url), publishing,
                                settings.membership_changes_topic, batch_size=settings.publisher_batch_size,
                                poll_interval=settings.publisher_poll_interval_seconds,
                                on_published=lags.extend)
    consumer = asyncio.create_task(consumer_process(settings, {}))
    task = asyncio.create_task(publisher.run())
    rng = random.Random(label)
    try:
        await asyncio.sleep(6)  # the consumer has joined its group
        lags.clear()
        async for number in paced(args.rate, args.rate * args.seconds):
            user_id = 1 + number  # a new user each: every command is one entry
            command = {"type": "update_user_segments", "user_id": user_id, "add": [f"SEGMENT_{rng.randint(0, 49)}"]}
            await producer.send(settings.assignments_commands_topic, orjson.dumps(command), key=str(user_id).encode())
        await drained(pool)
        await asyncio.sleep(0.5)
    finally:
        publisher.stop()
        await task
        await common.cancel_and_stop(consumer, producer, publishing)
    return lags, args.rate * args.seconds


async def consumer_round(new, args, commands: list[dict], mode: str, label: str) -> float:
    settings, pool = await new(label)
    await switch(pool, mode != OFF)
    await seed_segments(pool, args.segments)
    await preload(settings, commands)
    async with publisher_process(settings, mode == ON), await open_pool(settings, settings.topic_partitions) as own:
        rate = await measure_until_stored(pool, len(commands), f"{label}: consumer, stream {mode}",
                                          functools.partial(consume_all, settings, own), counted=consumed_counter())
        if mode == ON:
            await drained(pool)
    return rate


async def expiry_round(new, args, mode: str, label: str) -> float:
    settings, pool = await new(label)
    await switch(pool, mode != OFF)
    await seed_backlog(pool, args.rows)
    async with publisher_process(settings, mode == ON), await asyncpg.create_pool(
            settings.database_url, min_size=args.concurrency + 1, max_size=args.concurrency + 2) as own:
        rate = await drain(own, args.batch_size, args.concurrency, args.rows)
        if mode == ON:
            await drained(pool)
    return rate


async def main(args) -> None:
    tune_gc()  # the consumer runs in this process, as its service does
    commands = generate(args.commands, args.users, args.segments)
    p99s, p50s = [], []
    consumer: dict[str, list[float]] = {mode: [] for mode in MODES}
    expiry: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with bench_environment("changes", topic_partitions=args.partitions) as (_infra, new):
        for round_number in range(1, args.rounds + 1):
            lags, changes = await latency_round(new, args, f"latency{round_number}")
            if len(lags) < changes:
                raise RuntimeError(f"{len(lags)} of {changes} changes published")
            p50s.append(percentile(lags, 0.5) * 1000)
            p99s.append(percentile(lags, 0.99) * 1000)
            shift = (round_number - 1) % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                name = f"{mode.split()[0]}{round_number}"
                consumer[mode].append(await consumer_round(new, args, commands, mode, f"consumer_{name}"))
                expiry[mode].append(await expiry_round(new, args, mode, f"expiry_{name}"))
            print(f"  round {round_number}/{args.rounds}: p99 {p99s[-1]:.1f} ms; of off: consumer "
                  f"{consumer[OUTBOX][-1] / consumer[OFF][-1]:.0%} / {consumer[ON][-1] / consumer[OFF][-1]:.0%}, "
                  f"expiry {expiry[OUTBOX][-1] / expiry[OFF][-1]:.0%} / {expiry[ON][-1] / expiry[OFF][-1]:.0%} "
                  "(outbox only / on)", file=sys.stderr, flush=True)

    def ratio(rates: dict[str, list[float]], mode: str) -> str:
        return spread([on / off for on, off in zip(rates[mode], rates[OFF], strict=True)], "{:.1%}")

    common.report(f"membership changes ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions)", {
        "commit to publish": f"p50 {spread(p50s, '{:.1f}')} ms; p99 {spread(p99s, '{:.1f}')} ms at "
                             f"{args.rate} changes/s for {args.seconds} s (target p99 <= 100 ms)",
        "consumer, off": f"{spread(consumer[OFF])} commands/s ({len(commands):,} commands a round)",
        "consumer, outbox only / off": ratio(consumer, OUTBOX),
        "consumer, on / off": f"{ratio(consumer, ON)}   (target >= 85%)",
        "expiry, off": f"{spread(expiry[OFF])} rows/s ({args.rows:,} past-due memberships a round)",
        "expiry, outbox only / off": ratio(expiry, OUTBOX),
        "expiry, on / off": f"{ratio(expiry, ON)}   (target >= 85%)",
    })


def cli() -> None:
    common.cli(__doc__, main, rate=(500, "changes per second in the latency phase"), seconds=20,
               commands=100_000, users=100_000, segments=50, partitions=8, rows=200_000, batch_size=10_000,
               concurrency=2, rounds=3)


if __name__ == "__main__":
    cli()
