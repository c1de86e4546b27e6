"""What the consumer benchmarks share: the commands they send, the segments they name, getting the
commands onto the topic, running the consumer (in this process, or as its own process as
deployed), and timing it from the first outcome stored to the last."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import orjson
import psutil
from aiokafka import AIOKafkaProducer

from bench.common import (
    Progress,
)
from devstack.processes import stop_process
from services.command_consumer import metrics
from services.command_consumer.bootstrap import build_consumer
from shared.kafka import kafka_options


def generate(count: int, users: int, segments: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    slugs = [f"SEGMENT_{i}" for i in range(segments)]
    commands = []
    for i in range(count):
        picked = rng.sample(slugs, rng.randint(1, 3))
        field = "remove" if rng.random() < 0.2 else "add"
        commands.append({"type": "update_user_segments", "command_id": f"bench-{i}",
                         "user_id": rng.randint(1, users), field: picked})
    return commands


async def seed_segments(pool, segments: int) -> None:
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) "
                       "SELECT 'SEGMENT_' || g, now(), now() FROM generate_series(0, $1 - 1) AS g", segments)


def trace_context(rng: random.Random, sampled_share: float) -> list[tuple[str, bytes]]:
    """A W3C traceparent as a producer that traces `sampled_share` of its commands sends it."""
    flags = "01" if rng.random() < sampled_share else "00"
    return [("traceparent", f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) or 1:016x}-{flags}".encode())]


async def preload(settings, commands: list[dict], traced_share: float | None = None) -> None:
    """The commands on the assignments topic; with `traced_share`, each with the trace context of
    a producer that traces that share of them."""
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=20,
                                max_batch_size=256 * 1024, acks="all")
    await producer.start()
    progress = Progress("preloading", len(commands))
    rng = random.Random(3)
    try:
        deliveries = []
        for i, command in enumerate(commands, 1):
            headers = trace_context(rng, traced_share) if traced_share is not None else None
            deliveries.append(await producer.send(settings.assignments_commands_topic, orjson.dumps(command),
                                                  key=str(command["user_id"]).encode(), headers=headers))
            if i % 10_000 == 0:
                await asyncio.gather(*deliveries)
                deliveries.clear()
                progress.update(i)
        await asyncio.gather(*deliveries)
        progress.update(len(commands))
    finally:
        await producer.stop()


async def measure_until_stored(pool, total: int, label: str, run, cpu_seconds=None,
                               counted=None) -> float | tuple[float, float]:
    """Commands/s from the first outcome stored to the last one; with `cpu_seconds` (the CPU time
    the consumer has used so far), also the consumer's CPU microseconds a command over that span.
    `counted` gives the commands done so far without asking the database (an in-process
    consumer's own counter); else outcomes are counted in the database every 0.1 s, a scan that
    grows with the table and takes database time from the consumer it measures."""
    task = asyncio.create_task(run())
    progress = Progress(label, total)
    first = None
    try:
        while True:
            done = counted() if counted else await pool.fetchval("SELECT count(*) FROM command_outcomes")
            if done and first is None:
                first = (time.monotonic(), done, cpu_seconds() if cpu_seconds else 0.0)
            progress.update(done)
            if done >= total:
                rate = (total - first[1]) / (time.monotonic() - first[0])
                if cpu_seconds is None:
                    return rate
                return rate, (cpu_seconds() - first[2]) / (total - first[1]) * 1e6
            if task.done():
                task.result()
            # The span is timed at these checks, so their spacing bounds the rate's error: an
            # in-process counter (free to read) is checked far more often than the database.
            await asyncio.sleep(0.01 if counted else 0.1)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def consumed_counter():
    """Commands this process's consumers have finished (outcomes durable and published) since now."""
    def total() -> float:
        return sum(sample.value for metric in (metrics.COMMANDS, metrics.REPLAYED) for family in metric.collect()
                   for sample in family.samples if sample.name.endswith("_total"))

    start = total()
    return lambda: int(total() - start)


async def consume_all(settings, pool) -> None:
    consumer = build_consumer(settings, pool)
    try:
        await consumer.run()
    except asyncio.CancelledError:
        consumer.stop()
        raise


class ConsumerProcess:
    """The CPU time of the consumer process `consumer_process` runs, once it has started."""

    def __init__(self) -> None:
        self.process: psutil.Process | None = None

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


async def consumer_process(settings, extra_env: dict[str, str], watch: ConsumerProcess | None = None) -> None:
    """`python -m services.command_consumer` on these settings until cancelled (its /metrics
    served only when `extra_env` gives CONSUMER_METRICS_PORT)."""
    env = {**os.environ, **settings.to_env(), "CONSUMER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING", **extra_env}
    process = subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,  # noqa: ASYNC220
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if watch is not None:
        watch.process = psutil.Process(process.pid)
    try:
        while process.poll() is None:  # noqa: ASYNC110 - a process, not an event
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the consumer exited with status {process.returncode}")
    finally:
        await asyncio.to_thread(stop_process, process)


