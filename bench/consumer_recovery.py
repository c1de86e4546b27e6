"""Command consumer: time from a restart after SIGKILL to the first command applied again, with
static group membership (CONSUMER_GROUP_INSTANCE_ID) and without, in alternating rounds.

A killed consumer cannot leave its group. Without static membership the broker keeps its
partitions until the session timeout expires, then rebalances them to the restarted process;
with it, the restarted process rejoins as the same member and gets them back at once.

    python -m bench.consumer_recovery [--kills 3] [--rate 200]
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import orjson
from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import bench_environment, spread
from bench.consumer_throughput import seed_segments
from devstack.processes import stop_process
from shared.kafka import kafka_options


def start_consumer(settings, instance_id: str | None) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "CONSUMER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
    env.pop("CONSUMER_GROUP_INSTANCE_ID", None)
    if instance_id:
        env["CONSUMER_GROUP_INSTANCE_ID"] = instance_id
    return subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def produce_steadily(settings, rate: int, stopping: asyncio.Event) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=5, acks="all")
    await producer.start()
    rng, index = random.Random(4), 0
    try:
        while not stopping.is_set():
            for _ in range(max(1, rate // 20)):
                user = rng.randint(1, 100_000)
                await producer.send(settings.assignments_commands_topic, orjson.dumps(
                    {"type": "update_user_segments", "command_id": f"r-{index}", "user_id": user,
                     "add": [f"SEGMENT_{rng.randrange(50)}"]}), key=str(user).encode())
                index += 1
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()


async def applied(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM command_outcomes")


async def until_applying(pool, since: int, deadline: float) -> None:
    while await applied(pool) <= since:
        if time.monotonic() > deadline:
            raise RuntimeError("the consumer applied nothing within 120 s")
        await asyncio.sleep(0.02)


async def rounds(settings, pool, instance_id: str | None, kills: int, label: str) -> list[float]:
    """Start the consumer, then `kills` times: SIGKILL it once it applies, start it again at once,
    and time from that start to the first command it applies."""
    process = start_consumer(settings, instance_id)
    times = []
    try:
        await until_applying(pool, await applied(pool), time.monotonic() + 120)
        for kill in range(1, kills + 1):
            await asyncio.sleep(2)  # settled, applying as usual
            process.send_signal(signal.SIGKILL)
            process.wait()
            before = await applied(pool)
            started = time.monotonic()
            process = start_consumer(settings, instance_id)
            await until_applying(pool, before, started + 120)
            times.append(time.monotonic() - started)
            print(f"  {label}, kill {kill}/{kills}: applying again {times[-1]:.2f} s after the restart",
                  file=sys.stderr, flush=True)
    finally:
        await asyncio.to_thread(stop_process, process)
    return times


async def main(args) -> None:
    async with bench_environment("recovery") as (_infra, new):
        results: dict[str, list[float]] = {"static membership": [], "dynamic membership": []}
        for round_number in range(1, args.rounds + 1):
            for label, instance_id in (("static membership", f"bench-consumer-{round_number}"),
                                       ("dynamic membership", None)):
                settings, pool = await new(f"{label.split()[0]}_{round_number}")
                await seed_segments(pool, 50)
                stopping = asyncio.Event()
                producing = asyncio.create_task(produce_steadily(settings, args.rate, stopping))
                try:
                    results[label] += await rounds(settings, pool, instance_id, args.kills,
                                                   f"round {round_number}/{args.rounds}, {label}")
                finally:
                    stopping.set()
                    await producing
        session = settings.consumer_session_timeout_ms / 1000
    common.report(
        f"consumer recovery after SIGKILL (restart → first command applied; {args.rate} commands/s arriving, "
        f"session timeout {session:.0f} s)", {
            label: f"{spread(times, '{:.2f}')} s" + ("   (target <= 5 s)" if label.startswith("static") else
                                                   "   (the baseline: waits out the session timeout)")
            for label, times in results.items()})


def cli() -> None:
    common.cli(__doc__, main, kills=(3, "kills in each round"), rounds=(2, "rounds of each kind, alternating"),
               rate=(200, "commands produced a second meanwhile"))


if __name__ == "__main__":
    cli()
