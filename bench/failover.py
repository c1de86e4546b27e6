"""PostgreSQL failover on a pg_auto_failover formation (devstack/failover.py): the time from
SIGKILLing the primary (keeper and postmaster) to the first command applied on the new primary and
to the first read answered, with commands arriving at --rate a second and reads; and the
consumer's throughput on the formation (every commit waiting for the synchronous standby) as a
ratio of the same server alone (a formation of one node), on the same machine and broker, in the
same run. The formation shortens pg_auto_failover's health checks and its 30 s demote timeout
(devstack/failover.py), so the times measure the service's recovery, not the engine's defaults.

    python -m bench.failover [--rounds 3] [--rate 300] [--commands 50000]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import asyncpg
import httpx
import orjson

from bench import common
from bench.common import bench_environment, spread
from bench.consumer_workload import (
    consume_all,
    consumed_counter,
    consumer_process,
    generate,
    measure_until_stored,
    preload,
    seed_segments,
)
from devstack.failover import AutoFailoverCluster, missing
from services.command_consumer.repository import open_pool
from services.query_api.app import create_app
from shared.db import apply_migrations, create_pool
from shared.kafka import create_producer, ensure_topics
from shared.settings import Settings

RETRYING = {"DB_RETRY_ATTEMPTS": "100000", "DB_RETRY_MAX_BACKOFF_SECONDS": "0.5"}


def settings_for(kafka: str, database_url: str, **overrides) -> Settings:
    prefix = f"bench_failover_{uuid.uuid4().hex[:6]}"
    return Settings(_env_file=None, database_url=database_url, kafka_bootstrap_servers=kafka,
                    segments_commands_topic=f"{prefix}.segments.commands",
                    assignments_commands_topic=f"{prefix}.assignments.commands", results_topic=f"{prefix}.results",
                    dlq_topic=f"{prefix}.dlq", membership_changes_topic=f"{prefix}.changes",
                    consumer_group=f"{prefix}-group", consumer_metrics_port=0, expiry_metrics_port=0,
                    publisher_metrics_port=0, **overrides)


@contextlib.asynccontextmanager
async def formation(nodes: int):
    cluster = AutoFailoverCluster(nodes)
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(apply_migrations, cluster.url)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


# A read's status and headers (names in lower case): the load works with any HTTP client.
Get = Callable[[str], Awaitable[tuple[int, Mapping[str, str]]]]


def httpx_get(client: httpx.AsyncClient) -> Get:
    async def get(path: str) -> tuple[int, Mapping[str, str]]:
        response = await client.get(path)
        return response.status_code, response.headers
    return get


def aiohttp_get(session: aiohttp.ClientSession) -> Get:
    """Reads over real HTTP: aiohttp's client costs a fraction of httpx's per request, so one
    process can send 1,000 reads a second beside the rest of a failover test."""
    async def get(path: str) -> tuple[int, Mapping[str, str]]:
        async with session.get(path) as response:
            await response.read()
            return response.status, {name.lower(): value for name, value in response.headers.items()}
    return get


class Load:
    """Commands adding new users to segment HA at `rate` a second, and reads from `readers` tasks
    at `read_rate` a second in all, until stopped; what each read answered, and when reads came
    back after a kill."""

    def __init__(self, producer, topic: str, get: Get, rate: int, read_rate: int = 1000) -> None:
        self.producer, self.topic, self.get, self.rate, self.read_rate = producer, topic, get, rate, read_rate
        self.sent: list[str] = []
        self.statuses: dict[int, int] = {}
        self.missing_retry_after = 0
        self.killed_at: float | None = None
        self.first_read_after: float | None = None
        self.stopping = asyncio.Event()
        self.seconds = 0.0

    @property
    def reads_per_second(self) -> float:
        return sum(self.statuses.values()) / self.seconds if self.seconds else 0.0

    async def commands(self) -> None:
        started = time.monotonic()
        for number in itertools.count(1):
            if self.stopping.is_set():
                return
            await asyncio.sleep(max(0.0, started + number / self.rate - time.monotonic()))
            command = {"type": "update_user_segments", "user_id": number, "add": ["HA"], "command_id": f"c{number}"}
            await self.producer.send(self.topic, orjson.dumps(command), key=str(number).encode())
            self.sent.append(command["command_id"])

    async def reads(self, seed: int, interval: float) -> None:
        """One read every `interval` seconds; a read that took longer is not made up for with a burst."""
        rng = random.Random(seed)
        due = time.monotonic()
        while not self.stopping.is_set():
            asked = time.monotonic()
            status, headers = await self.get(f"/users/{rng.randint(1, max(1, len(self.sent)))}/segments")
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 503 and "retry-after" not in headers:
                self.missing_retry_after += 1
            if (status == 200 and self.killed_at and asked > self.killed_at
                    and self.first_read_after is None):  # the first read asked after the kill answered
                self.first_read_after = time.monotonic() - self.killed_at
            due = max(due + interval, time.monotonic() - interval)
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    @contextlib.asynccontextmanager
    async def running(self, readers: int = 32):
        started = time.monotonic()
        tasks = [asyncio.create_task(self.commands())] + [
            asyncio.create_task(self.reads(n, readers / self.read_rate)) for n in range(readers)]
        try:
            yield self
        finally:
            self.stopping.set()
            await asyncio.gather(*tasks)
            self.seconds = time.monotonic() - started


async def applied_since(url: str, first: int) -> bool:
    """Whether a command from number `first` on has been applied, on whichever server is primary."""
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = ANY($1::text[])",
                                        [f"c{number}" for number in range(first, first + 3000)]))
    except (OSError, asyncpg.PostgresError):
        return False
    finally:
        await conn.close()


async def seconds_until(condition, timeout: float = 120) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"nothing after {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def failover_round(kafka: str, cluster: AutoFailoverCluster, rate: int) -> tuple[float, float, float]:
    """(promoted, first command applied, first read answered), seconds after the kill."""
    settings = settings_for(kafka, cluster.url)
    await ensure_topics(settings)
    consumer = asyncio.create_task(consumer_process(settings, RETRYING))
    producer = create_producer(settings)
    await producer.start()
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
            await producer.send_and_wait(settings.segments_commands_topic, orjson.dumps(
                {"type": "create_segment", "slug": "HA", "command_id": "ha"}), key=b"HA")
            async with await create_pool(cluster.url, min_size=1, max_size=1) as pool:
                await seconds_until(lambda: pool.fetchval(
                    "SELECT count(*) FROM command_outcomes WHERE command_id = 'ha'"))
            load = Load(producer, settings.assignments_commands_topic, httpx_get(http), rate)
            async with load.running():
                await asyncio.sleep(5)
                old = await asyncio.to_thread(cluster.primary)
                first = len(load.sent) + 1
                load.killed_at = time.monotonic()
                await asyncio.to_thread(cluster.kill, old)
                promoted = await seconds_until(functools.partial(promoted_elsewhere, cluster, old))
                applied = promoted + await seconds_until(functools.partial(applied_since, cluster.url, first))
                await seconds_until(functools.partial(_answered, load))
            if load.statuses.get(500) or load.missing_retry_after:
                raise RuntimeError(f"reads answered {load.statuses}; {load.missing_retry_after} 503s had no "
                                   "Retry-After")
            return promoted, applied, load.first_read_after or float("nan")
    finally:
        await common.cancel_and_stop(consumer, producer)


async def _answered(load: Load) -> bool:
    return load.first_read_after is not None


async def promoted_elsewhere(cluster: AutoFailoverCluster, old: str) -> bool:
    """Whether a node other than `old` takes writes."""
    return await asyncio.to_thread(cluster.primary) not in (None, old)


async def throughput(kafka: str, cluster: AutoFailoverCluster, commands: list[dict], label: str) -> float:
    settings = settings_for(kafka, cluster.url)
    await ensure_topics(settings)
    async with await create_pool(cluster.url, min_size=1, max_size=2) as pool:
        await seed_segments(pool, 50)
        await preload(settings, commands)
        async with await open_pool(settings, settings.topic_partitions) as own:
            return await measure_until_stored(pool, len(commands), label, functools.partial(consume_all, settings, own),
                                              counted=consumed_counter())


async def main(args) -> None:
    if reason := missing():
        raise SystemExit(reason)
    commands = generate(args.commands, 100_000, 50)
    promoted, applied, read, synchronous, alone = [], [], [], [], []
    async with bench_environment("failover") as (infra, _new):
        kafka = infra.kafka_bootstrap_servers
        for round_number in range(1, args.rounds + 1):
            async with formation(2) as cluster:
                synchronous.append(await throughput(kafka, cluster, commands, f"round {round_number}: synchronous"))
                times = await failover_round(kafka, cluster, args.rate)
            for figures, value in zip((promoted, applied, read), times, strict=True):
                figures.append(value)
            async with formation(1) as cluster:
                alone.append(await throughput(kafka, cluster, commands, f"round {round_number}: one server"))
            print(f"  round {round_number}/{args.rounds}: promoted {times[0]:.1f} s, command {times[1]:.1f} s, "
                  f"read {times[2]:.1f} s; throughput {synchronous[-1] / alone[-1]:.0%} of one server",
                  file=sys.stderr, flush=True)
    common.report(f"failover (pg_auto_failover, PostgreSQL 15, commands at {args.rate}/s)", {
        "kill to promotion": f"{spread(promoted, '{:.1f}')} s",
        "kill to first command applied": f"{spread(applied, '{:.1f}')} s",
        "kill to first read answered": f"{spread(read, '{:.1f}')} s",
        "consumer, synchronous standby": f"{spread(synchronous)} commands/s ({len(commands):,} a round)",
        "consumer, one server": f"{spread(alone)} commands/s",
        "synchronous / one server": spread([s / a for s, a in zip(synchronous, alone, strict=True)], "{:.1%}"),
    })


def cli() -> None:
    common.cli(__doc__, main, rounds=3, rate=(300, "commands a second while the primary is killed"),
               commands=(50_000, "commands a throughput round"))


if __name__ == "__main__":
    cli()
