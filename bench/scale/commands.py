"""Commands timed from their record to their outcome on the results topic: percent changes,
and segment deletions with the commands sent around them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import common
from bench.scale.data import slug
from services.command_consumer.bootstrap import build_consumer
from shared.kafka import kafka_options

PROBE_SEGMENT_EVERY, PROBE_USER_EVERY = 0.1, 0.02  # seconds between the commands sent during a deletion
REPLICA_LAG_EVERY = 0.1  # seconds between two looks at the replicas' lag
# How far behind the primary's WAL the furthest replica has replayed, in bytes and (as the replica
# last acknowledged it) in seconds; no row without a replica streaming from the primary.
REPLICA_LAG_SQL = """
SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::float8 AS bytes,
       max(EXTRACT(EPOCH FROM replay_lag))::float8 AS seconds
FROM pg_stat_replication HAVING count(*) > 0
"""


async def peak_replica_lag(db: asyncpg.Pool | asyncpg.Connection, stop: asyncio.Event) -> dict[str, float] | None:
    """The largest lag of the replicas streaming from the primary, looked at every
    REPLICA_LAG_EVERY seconds and once more when `stop` is set: replay bytes behind (MiB) and
    replay lag (s); None when no replica was streaming."""
    peak: dict[str, float] | None = None
    while True:
        stopping = stop.is_set()
        row = await db.fetchrow(REPLICA_LAG_SQL)
        if row is not None:
            peak = peak or {"replica lag MiB": 0.0, "replica lag s": 0.0}
            peak["replica lag MiB"] = max(peak["replica lag MiB"], (row["bytes"] or 0.0) / 2**20)
            peak["replica lag s"] = max(peak["replica lag s"], row["seconds"] or 0.0)
        if stopping:
            return peak
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPLICA_LAG_EVERY)


class Outcomes:
    """The results topic read as it is written: when each command's outcome arrived, in seconds
    from the command's record timestamp (the time a caller waits for it, whatever the consumer
    wrote into the outcome)."""

    def __init__(self, settings) -> None:
        self._settings = settings
        self._reader = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False, fetch_max_wait_ms=10)
        self._arrived: dict[str, float] = {}
        self._sent: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Outcomes:
        await self._reader.start()
        partitions = self._reader.partitions_for_topic(self._settings.results_topic) or set()
        if not partitions:
            partitions = set(range(self._settings.topic_partitions))
        self._reader.assign([TopicPartition(self._settings.results_topic, p) for p in partitions])
        await self._reader.seek_to_end()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_exc) -> None:
        await common.cancel_and_stop(self._task, self._reader)

    async def _read(self) -> None:
        while True:
            batch = await self._reader.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for record in records:
                    self._arrived.setdefault(record.key.decode(), now)

    async def send(self, producer, topic: str, command: dict, key: str) -> str:
        metadata = await producer.send_and_wait(topic, orjson.dumps(command), key=key.encode())
        self._sent[command["command_id"]] = metadata.timestamp / 1000
        return command["command_id"]

    async def seconds(self, command_id: str, timeout: float = 3600) -> float:
        """Seconds from the command's record to its outcome, once the outcome has arrived."""
        deadline = time.monotonic() + timeout
        while command_id not in self._arrived:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no outcome for {command_id}")
            await asyncio.sleep(0.01)
        return self._arrived[command_id] - self._sent[command_id]


@contextlib.asynccontextmanager
async def consumer_running(settings, pool, outcomes: Outcomes, producer) -> AsyncIterator[None]:
    """A consumer in this process, its partitions assigned and a first command applied before
    anything is timed."""
    consumer = build_consumer(settings, pool)
    task = asyncio.create_task(consumer.run())
    try:
        await outcomes.seconds(await outcomes.send(producer, settings.segments_commands_topic, {
            "type": "update_segment", "slug": slug(0), "description": "warm",
            "command_id": f"warm-{uuid.uuid4().hex[:8]}"}, slug(0)), timeout=120)
        yield
    finally:
        consumer.stop()
        await asyncio.gather(task, return_exceptions=True)


async def percent_change(settings, outcomes: Outcomes, producer, target: str) -> float:
    """10 % → 50 % of a segment, timed; then back to 10 %, untimed."""
    tag = uuid.uuid4().hex[:8]
    seconds = await outcomes.seconds(await outcomes.send(producer, settings.segments_commands_topic, {
        "type": "update_segment", "slug": target, "percent": 50, "command_id": f"up-{tag}"}, target))
    await outcomes.seconds(await outcomes.send(producer, settings.segments_commands_topic, {
        "type": "update_segment", "slug": target, "percent": 10, "command_id": f"down-{tag}"}, target))
    return seconds


async def deletion(settings, pool, outcomes: Outcomes, producer, target: str, users: int,
                   probe_slugs: tuple[str, str], idle_seconds: float) -> dict[str, float]:
    """Delete `target` while segment commands behind it (same key) and user commands (every
    partition) keep coming, from `idle_seconds` before the deletion to `idle_seconds` after its
    outcome: the deletion's time, its WAL, and the longest wait of each kind of command sent
    during it and of those sent before and after it (what the same commands wait on this machine
    without a deletion), and the peak lag of the replicas streaming from the primary meanwhile.
    The segment commands change one segment and the user commands add and remove another: a user
    command naming a segment that a segment command fetched with it changes waits for that
    command by design (services/command_consumer/ordering.py), whatever else is going on."""
    tag = uuid.uuid4().hex[:8]
    rng = random.Random(tag)
    sent: dict[str, list[tuple[str, float]]] = {"segment": [], "user": []}
    done = asyncio.Event()

    async def probe(kind: str, every: float) -> None:
        async for index in common.paced(1 / every):
            if done.is_set():
                return
            command_id = f"probe-{kind}-{tag}-{index}"
            at = time.monotonic()
            if kind == "segment":
                await outcomes.send(producer, settings.segments_commands_topic, {
                    "type": "update_segment", "slug": probe_slugs[0], "description": f"probe {index}",
                    "command_id": command_id}, target)
            else:
                user = rng.randint(1, users)
                await outcomes.send(producer, settings.assignments_commands_topic, {
                    "type": "update_user_segments", "user_id": user, "command_id": command_id,
                    ("add" if index % 2 else "remove"): [probe_slugs[1]]}, str(user))
            sent[kind].append((command_id, at))

    probes = [asyncio.create_task(probe("segment", PROBE_SEGMENT_EVERY)),
              asyncio.create_task(probe("user", PROBE_USER_EVERY))]
    await asyncio.sleep(idle_seconds)
    wal_before = await pool.fetchval("SELECT pg_current_wal_lsn()")
    deleting = time.monotonic()
    lag = asyncio.create_task(peak_replica_lag(pool, done))  # until the probes end
    try:
        seconds = await outcomes.seconds(await outcomes.send(producer, settings.segments_commands_topic, {
            "type": "delete_segment", "slug": target, "command_id": f"delete-{tag}"}, target))
        wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal_before)
        finished = time.monotonic()
        await asyncio.sleep(idle_seconds)
    finally:
        done.set()
        await asyncio.gather(*probes)
    figures = {"seconds": seconds, "wal_mb": float(wal) / 2**20, **(await lag or {})}
    for kind, commands in sent.items():
        waits = [(at, await outcomes.seconds(command_id, timeout=600)) for command_id, at in commands]
        figures[f"{kind} wait"] = max(wait for at, wait in waits if deleting <= at <= finished)
        figures[f"{kind} wait idle"] = max(wait for at, wait in waits if not deleting <= at <= finished)
    return figures
