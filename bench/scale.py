"""The service at the scale of a large marketplace, each figure against its baseline in the same run.

Seeds, with COPY and a progress bar, a database of --users registered users, --memberships
explicit memberships over --segments segments (sizes Zipf-like: a few with millions of members,
most with thousands; 2 × --rounds of them with exactly --deleted members, for the deletions),
--rollout-segments of them with a rollout (the largest among them), and --history rows over the
last 3 months; and a baseline database of 200,000 users made by the same generator, every count
scaled down with the users. Then:

- storage: bytes per membership and per history row, tables plus indexes, against the bare tuple;
- the hot read (wrk, GET /users/{id}/segments, one API process per database): req/s, p99 and
  requests a CPU second at full size as a ratio of the baseline, with uniformly random users
  (a cold working set) and with Zipf-skewed users;
- a percent change from 10 % to 50 % of a segment whose explicit members are 1 % of the users, and
  of the largest segment, on each database: time to its outcome;
- the all-users report of last month, with two rollout changes added to it (the largest segment
  and the percent changes' one, each raised from 0 to 10 % of the users), streamed through the
  API (one process): rows a second against COPY … TO STDOUT of the month's explicit rows, and
  the API's peak RSS;
- with `migrate` among --measures: the full database is made at the schema before
  --migrate-from and seeded, then the migrations from there on are applied to it, timed, while
  a writer inserts and deletes a membership every 50 ms: the longest a write waited (against
  the same writer idle), and the longest any lock that blocks writes was held on a table;
- with `expiry`: --expiring memberships of the full database due within the same minute, removed
  by the expiry worker (its configured batch and connections) and, in alternate rounds, by one
  DELETE … RETURNING into one INSERT (the limit): rows a second of each; and the hot read's p99
  at a steady --read-rate (Zipf users) during the worker's drain against the same reads idle;
- delete_segment of a segment with --deleted explicit members, in chunks (the default; `delete`)
  and in one transaction (CONSUMER_SEGMENT_REMOVAL_CHUNK=0; `delete-at-once`): time to its
  outcome, the WAL it writes, and the longest wait of the commands sent meanwhile, segment
  commands behind it in its partition and user commands on every partition (record timestamp to
  outcome), against the longest wait of the same commands in the --idle-probes seconds before
  and after it (the machine's own stalls: the broker, PostgreSQL and this process share its
  cores).

Every figure is the median and range of --rounds rounds; --measures picks some of them (both
databases are seeded whatever it picks). The full size of the design card:

    python -m bench.scale --users 10000000 --memberships 50000000 --history 30000000 --deleted 2000000 \
        --expiring 1000000

The defaults are a quick run of a few minutes. Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import common
from bench.common import Progress, bench_environment, percentile, spread
from bench.expiry import LIMIT_SQL, drain
from bench.read_throughput import serve, wrk
from bench.report_stream import copy_seconds, stream_month
from devstack.processes import free_port, stop_process
from services.command_consumer.bootstrap import build_consumer
from services.expiry_worker import member_counts
from services.expiry_worker.partitions import add_months, month_start
from services.query_api.reports import EXPLICIT_COPY_SQL, month_bounds
from shared.db import apply_migrations, create_pool
from shared.kafka import create_producer, kafka_options
from shared.settings import Settings

BASELINE_USERS = 200_000
MEASURES = ("migrate", "storage", "reads", "report", "percent", "delete", "delete-at-once", "expiry")
# Lock modes that block INSERT, UPDATE and DELETE (they conflict with ROW EXCLUSIVE).
WRITE_BLOCKING = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
PROBE_SEGMENT_EVERY, PROBE_USER_EVERY = 0.1, 0.02  # seconds between the commands sent during a deletion
# Users drawn by wrk: uniformly, or log-uniformly (user ⌊N^u⌋: the lower ids far more often, a
# hot set as real traffic has).
ZIPF_LUA = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/users/" .. math.floor({users} ^ math.random()) .. "/segments")
end
"""


def slug(rank: int) -> str:
    return f"SEG_{rank:04d}"


def segment_sizes(segments: int, memberships: int, users: int, deleted: int, rounds: int) -> list[int]:
    """Members of each segment by rank: Zipf (1/rank) over the total, at most every user; ranks
    1 … 2 × rounds (after the largest) hold exactly `deleted`, for the deletion rounds, and the
    next one 1 % of the users, for the percent changes."""
    harmonic = sum(1 / rank for rank in range(1, segments + 1))
    sizes = [min(users, max(1, round(memberships / harmonic / rank))) for rank in range(1, segments + 1)]
    for rank in range(1, 1 + 2 * rounds):
        sizes[rank] = min(users, deleted)
    sizes[percent_rank(rounds)] = max(1, users // 100)
    return sizes


def percent_rank(rounds: int) -> int:
    return 1 + 2 * rounds


def strides(count: int, users: int, rng: random.Random) -> list[int]:
    """A step coprime with `users` for each segment: member i is user (offset + i × step) mod
    users + 1, so a segment's members are distinct and spread over every user id."""
    found = []
    while len(found) < count:
        step = rng.randrange(users // 3 + 1, users) if users > 3 else 1
        if math.gcd(step, users) == 1:
            found.append(step)
    return found


async def _pipe(conn_from: asyncpg.Connection, conn_to: asyncpg.Connection, query: str, args: tuple,
                table: str, columns: list[str], progress: Progress) -> None:
    """COPY (query) TO STDOUT on one connection into COPY table FROM STDIN on another: the rows
    are made by the server and loaded as a bulk load, never one statement a row."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
    done = 0

    async def produce(chunk: bytes) -> None:
        nonlocal done
        done += chunk.count(b"\n")
        progress.update(done)
        await queue.put(chunk)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def read() -> None:
        try:
            await conn_from.copy_from_query(query, *args, output=produce)
        finally:
            await queue.put(None)

    await asyncio.gather(read(), conn_to.copy_to_table(table, source=chunks(), columns=columns))
    progress.update(progress.total)


@contextlib.asynccontextmanager
async def without_keys(conn: asyncpg.Connection, table: str) -> AsyncIterator[None]:
    """Drop a table's constraints and indexes for a bulk load and build them again after it, as
    they were (one sort each rather than an index entry placed a row at a time)."""
    constraints = await conn.fetch("SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
                                   "WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'f')", table)
    indexes = await conn.fetch("SELECT pg_get_indexdef(indexrelid) AS definition, indexrelid::regclass::text AS name "
                               "FROM pg_index WHERE indrelid = $1::regclass AND indexrelid NOT IN "
                               "(SELECT conindid FROM pg_constraint WHERE conrelid = $1::regclass)", table)
    for row in constraints:
        await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{row["conname"]}"')
    for row in indexes:
        await conn.execute(f"DROP INDEX {row['name']}")
    yield
    # A partitioned table's index is defined ON ONLY the parent; built again on every partition.
    indexes = [{**row, "definition": row["definition"].replace(" ON ONLY ", " ON ")} for row in indexes]
    steps = Progress(f"{table}: keys and indexes built again", len(constraints) + len(indexes))
    for done, row in enumerate(constraints, 1):
        await conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{row["conname"]}" {row["definition"]}')
        steps.update(done)
    for done, row in enumerate(indexes, len(constraints) + 1):
        await conn.execute(row["definition"])
        steps.update(done)


MEMBERSHIPS_SQL = """
SELECT (s.start + i * s.step) % $5 + 1, s.id, now() - (i % 90) * interval '1 day',
       CASE WHEN i % 10 = 0 THEN now() + interval '30 days' + (i % 1000) * interval '1 minute' END
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS s(id, size, start, step),
     generate_series(0, s.size - 1) AS i
"""
# History over the last 90 days in time order, users uniform, segments skewed like the memberships.
HISTORY_SQL = """
SELECT 1 + floor(random() * $1)::bigint,
       'SEG_' || lpad(least(floor(power(random(), 3) * $2), $2 - 1)::int::text, 4, '0'),
       CASE WHEN g % 10 < 7 THEN 'I' ELSE 'D' END,
       now() - interval '90 days' + (g::float8 / $3) * interval '90 days',
       'manual', CASE WHEN g % 10 < 9 THEN 'manual' ELSE 'ttl' END
FROM generate_series(0, $3 - 1) AS g
"""


async def seed(database_url: str, label: str, users: int, memberships: int, segments: int, rollout_segments: int,
               history: int, deleted: int, rounds: int) -> int:
    """The data set, on connections without a statement timeout and with the changes stream off
    (a seed is not a stream of changes anyone subscribed to); returns the memberships made."""
    rng = random.Random(7)
    sizes = segment_sizes(segments, memberships, users, deleted, rounds)
    # The largest, the percent changes' and the smallest.
    rollout = {0, percent_rank(rounds), *range(segments - rollout_segments + 2, segments)}
    source = await asyncpg.connect(database_url, command_timeout=None)
    target = await asyncpg.connect(database_url, command_timeout=None)
    try:
        await target.execute("SET segmentation.membership_changes = off")
        await target.execute("SET maintenance_work_mem = '1GB'")
        await target.executemany(
            "INSERT INTO segments (slug, percent, description, created_at, updated_at) "
            "VALUES ($1, $2, $3, now() - interval '120 days', now())",
            [(slug(rank), (10 if rank in (0, percent_rank(rounds)) else 1 + rank % 50) if rank in rollout else 0,
              f"experiment {rank}") for rank in range(segments)])
        ids = [row["id"] for row in await target.fetch("SELECT id FROM segments ORDER BY slug")]
        await _pipe(source, target, "SELECT g, now() - interval '120 days' FROM generate_series(1, $1) AS g",
                    (users,), "users", ["user_id", "registered_at"], Progress(f"{label}: users", users))
        total = sum(sizes)
        async with without_keys(target, "memberships"):
            await _pipe(source, target, MEMBERSHIPS_SQL,
                        (ids, sizes, [rng.randrange(users) for _ in sizes], strides(len(sizes), users, rng), users),
                        "memberships", ["user_id", "segment_id", "added_at", "expires_at"],
                        Progress(f"{label}: memberships", total))
        await common.past_history_partitions(target, 4)
        async with without_keys(target, "membership_history"):
            await _pipe(source, target, HISTORY_SQL, (users, segments, history), "membership_history",
                        ["user_id", "segment_slug", "operation", "executed_at", "source", "reason"],
                        Progress(f"{label}: history", history))
        steps = Progress(f"{label}: sizes kept, statistics, checkpoint", 3)
        if await target.fetchval("SELECT to_regclass('segment_member_counts') IS NOT NULL"):
            await member_counts.fold(target)  # what the size triggers wrote during the load, as the worker folds it
        steps.update(1)
        await target.execute("VACUUM ANALYZE")
        steps.update(2)
        await target.execute("CHECKPOINT")  # the load's pages written now, not during the rounds
        steps.update(3)
        return total
    finally:
        await source.close()
        await target.close()


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


async def migrations(settings, pool: asyncpg.Pool) -> dict:
    """Apply the pending migrations, timed, while a writer inserts and deletes one membership
    every 50 ms and a sampler notes the locks that block writes; the writer runs idle first."""
    segment = await pool.fetchval("SELECT id FROM segments ORDER BY id DESC LIMIT 1")
    probe_user = await pool.fetchval("SELECT max(user_id) + 1 FROM users")
    waits: list[float] = []
    held: dict[tuple, list[float]] = {}  # (pid, table, mode) → [first seen, last seen]

    async def write(stop: asyncio.Event) -> None:
        async with pool.acquire() as conn:
            while not stop.is_set():
                started = time.monotonic()
                async with conn.transaction():
                    await conn.execute("INSERT INTO memberships (user_id, segment_id, added_at) VALUES ($1, $2, now()) "
                                       "ON CONFLICT DO NOTHING", probe_user, segment)
                    await conn.execute("DELETE FROM memberships WHERE user_id = $1 AND segment_id = $2",
                                       probe_user, segment)
                waits.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

    async def sample(stop: asyncio.Event) -> None:
        async with pool.acquire() as conn:
            while not stop.is_set():
                now = time.monotonic()
                for row in await conn.fetch(
                        "SELECT l.pid, c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        "WHERE l.granted AND l.mode = ANY($1::text[]) AND c.relkind IN ('r', 'p') "
                        "AND l.pid <> pg_backend_pid()", list(WRITE_BLOCKING)):
                    held.setdefault(tuple(row), [now, now])[1] = now
                await asyncio.sleep(0.05)

    async def measured(work) -> float:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(write(stop)), asyncio.create_task(sample(stop))]
        try:
            started = time.monotonic()
            await work()
            return time.monotonic() - started
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    await measured(lambda: asyncio.sleep(5))
    idle, waits[:] = max(waits), []
    held.clear()
    applied: list[str] = []

    async def migrate() -> None:
        applied.extend(await asyncio.to_thread(apply_migrations, settings.database_url))

    seconds = await measured(migrate)
    longest = max(held.items(), key=lambda item: item[1][1] - item[1][0], default=None)
    print(f"  migrations {', '.join(applied)} in {seconds:.1f} s; longest write {max(waits):.2f} s",
          file=sys.stderr, flush=True)
    return {"applied": applied, "seconds": seconds, "longest write": max(waits), "idle write": idle,
            "lock": (f"{longest[0][2]} on {longest[0][1]} {longest[1][1] - longest[1][0]:.1f} s" if longest
                     else "none seen")}


async def storage(pool: asyncpg.Pool) -> dict[str, tuple[float, float, float]]:
    """(bytes a row with indexes, of which the table's, the bare tuple) of memberships and history."""
    figures = {}
    for table in ("memberships", "membership_history"):
        total, heap = await pool.fetchrow(
            "SELECT sum(pg_total_relation_size(relid)), sum(pg_relation_size(relid)) "
            "FROM (SELECT $1::regclass AS relid UNION SELECT relid FROM pg_partition_tree($1::regclass)) AS r", table)
        rows = await pool.fetchval(f"SELECT count(*) FROM {table}")
        tuple_bytes = await pool.fetchval(f"SELECT avg(pg_column_size(t.*)) FROM {table} t "
                                          "TABLESAMPLE SYSTEM (1) REPEATABLE (1)")
        figures[table] = (float(total) / rows, float(heap) / rows, float(tuple_bytes))
    return figures


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
    without a deletion). The segment commands
    change one segment and the user commands add and remove another: a user command naming a
    segment that a segment command fetched with it changes waits for that command by design
    (services/command_consumer/ordering.py), whatever else is going on."""
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
    try:
        seconds = await outcomes.seconds(await outcomes.send(producer, settings.segments_commands_topic, {
            "type": "delete_segment", "slug": target, "command_id": f"delete-{tag}"}, target))
        wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal_before)
        finished = time.monotonic()
        await asyncio.sleep(idle_seconds)
    finally:
        done.set()
        await asyncio.gather(*probes)
    figures = {"seconds": seconds, "wal_mb": float(wal) / 2**20}
    for kind, commands in sent.items():
        waits = [(at, await outcomes.seconds(command_id, timeout=600)) for command_id, at in commands]
        figures[f"{kind} wait"] = max(wait for at, wait in waits if deleting <= at <= finished)
        figures[f"{kind} wait idle"] = max(wait for at, wait in waits if not deleting <= at <= finished)
    return figures


async def hot_reads(ports: dict[str, tuple[int, int]], users: dict[str, int], duration: int,
                    round_number: int) -> dict[tuple[str, str], dict]:
    """Each database with uniform and Zipf users, in turn first and last from round to round."""
    runs = [(name, kind) for name in ports for kind in ("uniform", "zipf")]
    figures = {}
    for name, kind in runs if round_number % 2 else runs[::-1]:
        port, pid = ports[name]
        figures[(name, kind)] = await asyncio.to_thread(
            wrk, port, users[name], duration, 32, (), pid, 3, ZIPF_LUA if kind == "zipf" else None)
    return figures


async def read_latencies(port: int, users: int, rate: int, stop: asyncio.Event) -> list[float]:
    """GET /users/{id}/segments at a steady `rate` a second, users Zipf-skewed as ZIPF_LUA draws
    them, until `stop`: each read's seconds. Each read starts on its turn whether or not the
    ones before it have answered, so a stall shows in every read it delays."""
    rng = random.Random(11)
    latencies: list[float] = []
    running: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async def read(user: int) -> None:
            started = time.monotonic()
            async with session.get(f"/users/{user}/segments") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET /users/{user}/segments answered {response.status}")
            latencies.append(time.monotonic() - started)

        async for _ in common.paced(rate):
            if stop.is_set():
                break
            task = asyncio.create_task(read(math.floor(users ** rng.random())))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
    return latencies


async def reads_p99(port: int, users: int, rate: int, work) -> tuple[float, object]:
    """The reads' p99 in milliseconds while `work` (awaited) runs, and what it returned."""
    stop = asyncio.Event()
    reads = asyncio.create_task(read_latencies(port, users, rate, stop))
    try:
        result = await work
    finally:
        stop.set()
    return percentile(await reads, 0.99) * 1000, result


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
                p99, rate = await reads_p99(port, users, args.read_rate, drain(
                    pool, settings.expiry_batch_size, settings.expiry_concurrency, due))
                figures["worker"].append(rate)
                figures["during"].append(p99)
            else:
                started = time.monotonic()
                await bulk.execute(LIMIT_SQL)
                figures["limit"].append(due / (time.monotonic() - started))
        idle, _ = await reads_p99(port, users, args.read_rate, asyncio.sleep(args.duration))
        figures["idle"].append(idle)
        print(f"  expiry round {round_number}/{args.rounds}: worker {figures['worker'][-1]:,.0f} rows/s, limit "
              f"{figures['limit'][-1]:,.0f} rows/s; read p99 {figures['during'][-1]:.1f} ms draining, "
              f"{idle:.1f} ms idle", file=sys.stderr, flush=True)
    return figures


def scaled(args, users: int) -> dict:
    factor = users / args.users
    return {"users": users, "memberships": max(args.segments, round(args.memberships * factor)),
            "segments": args.segments, "rollout_segments": args.rollout_segments,
            "history": round(args.history * factor), "deleted": max(1, round(args.deleted * factor)),
            "rounds": args.rounds}


async def main(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for this benchmark: apt-get install wrk")
    if percent_rank(args.rounds) + 1 > args.segments - args.rollout_segments:
        raise SystemExit("--segments must leave room for the deletion rounds' segments")
    measures = set(args.measures.split(","))
    if not measures or measures - set(MEASURES):
        raise SystemExit(f"--measures: a comma-separated choice of {', '.join(MEASURES)}")
    if args.reuse and "migrate" in measures:
        raise SystemExit("--reuse: `migrate` needs a database seeded at the schema before --migrate-from")
    async with bench_environment("scale") as (_infra, new):
        if args.reuse:
            full_settings, full_pool = await new("full", database_url=args.reuse)
            made, seeded = await full_pool.fetchval("SELECT count(*) FROM memberships"), None
            if measures & {"delete", "delete-at-once"} and await full_pool.fetchval(
                    "SELECT count(*) FROM segments WHERE slug = ANY($1::text[]) AND deleted_at IS NULL",
                    [slug(rank) for rank in range(1, 1 + 2 * args.rounds)]) < 2 * args.rounds:
                raise SystemExit("--reuse: an earlier run deleted the segments `delete` deletes; seed anew")
        else:
            full_settings, full_pool = await new("full", args.migrate_from if "migrate" in measures else None)
            started = time.monotonic()
            made = await seed(full_settings.database_url, "full size", **scaled(args, args.users))
            seeded = time.monotonic() - started
            print(f"  the full-size database, for --reuse: {full_settings.database_url}", file=sys.stderr, flush=True)
        base_settings, base_pool = await new("base")
        await seed(base_settings.database_url, "baseline", **scaled(args, BASELINE_USERS))
        migrated = await migrations(full_settings, full_pool) if "migrate" in measures else None
        sizes = {name: await storage(pool) for name, pool in (("full", full_pool), ("baseline", base_pool))
                 if "storage" in measures}

        reads: dict[tuple[str, str], list[dict]] = {}
        servers = {}
        try:
            for name, settings in (("full", full_settings), ("baseline", base_settings)):
                port = free_port()
                env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", "API_WORKERS": str(args.workers),
                       "API_PORT": str(port)}
                servers[name] = (serve([sys.executable, "-m", "services.query_api", "--port", str(port)], env, port),
                                 port)
            ports = {name: (port, process.pid) for name, (process, port) in servers.items()}
            for round_number in range(1, args.rounds + 1 if "reads" in measures else 1):
                figures = await hot_reads(ports, {"full": args.users, "baseline": BASELINE_USERS}, args.duration,
                                          round_number)
                for key, value in figures.items():
                    reads.setdefault(key, []).append(value)
                print(f"  hot read round {round_number}/{args.rounds}: " + ", ".join(
                    f"{name} {kind} {value['rps']:,.0f} req/s p99 {value['p99']:.1f} ms"
                    for (name, kind), value in figures.items()), file=sys.stderr, flush=True)
        finally:
            for process, _port in servers.values():
                stop_process(process)

        expired = {}
        if "expiry" in measures:
            port = free_port()
            env = {**os.environ, **full_settings.to_env(), "LOG_LEVEL": "WARNING", "API_WORKERS": str(args.workers),
                   "API_PORT": str(port)}
            api = serve([sys.executable, "-m", "services.query_api", "--port", str(port)], env, port)
            try:
                expired = await expiry(full_settings, full_pool, port, args.users, args)
            finally:
                stop_process(api)

        reports = {}
        if "report" in measures:
            for name, settings, pool in (("full", full_settings, full_pool), ("baseline", base_settings, base_pool)):
                year, month = await report_month(pool, [slug(0), slug(percent_rank(args.rounds))])
                reports[name] = await report_figures(settings, pool, year, month, args.rounds)

        producer = create_producer(full_settings)
        await producer.start()
        # One transaction of millions of rows outlasts the services' statement timeout (the
        # consumer retries it until it gives up): measured without one, to see its cost.
        untimed_pool = await create_pool(full_settings.database_url, max_size=12, command_timeout=None)
        percent: dict[tuple[str, str], list[float]] = {}
        targets_of_percent = {"explicit members 1% of users": slug(percent_rank(args.rounds)),
                              "the largest segment": slug(0)}
        deletes: dict[str, list[dict]] = {}
        # Each database's consumer publishes to its own results topic: a reader each.
        async with Outcomes(full_settings) as full_outcomes, Outcomes(base_settings) as base_outcomes:
            try:
                for name, settings, pool, outcomes in (("full", full_settings, full_pool, full_outcomes),
                                                       ("baseline", base_settings, base_pool, base_outcomes)):
                    if "percent" not in measures:
                        break
                    async with consumer_running(settings, pool, outcomes, producer):
                        for target, target_slug in targets_of_percent.items():
                            for _ in range(args.rounds):
                                percent.setdefault((target, name), []).append(
                                    await percent_change(settings, outcomes, producer, target_slug))
                            print(f"  percent change on {name}, {target}: " + ", ".join(
                                f"{s:.2f} s" for s in percent[(target, name)]), file=sys.stderr, flush=True)
                variants = {name: settings for name, settings, measure in (
                    ("in chunks", full_settings, "delete"),
                    ("one transaction", full_settings.model_copy(update={"consumer_segment_removal_chunk": 0}),
                     "delete-at-once")) if measure in measures}
                pools = {"in chunks": full_pool, "one transaction": untimed_pool}
                targets = iter(slug(rank) for rank in range(1, 1 + 2 * args.rounds))
                # Small segments without a rollout.
                probe_slugs = (slug(args.segments - args.rollout_segments),
                               slug(args.segments - args.rollout_segments - 1))
                for round_number in range(1, args.rounds + 1 if variants else 1):
                    order = list(variants) if round_number % 2 else list(variants)[::-1]
                    for name in order:
                        async with consumer_running(variants[name], pools[name], full_outcomes, producer):
                            deletes.setdefault(name, []).append(await deletion(
                                variants[name], pools[name], full_outcomes, producer, next(targets), args.users,
                                probe_slugs, args.idle_probes))
                        print(f"  delete round {round_number}/{args.rounds}, {name}: " + ", ".join(
                            f"{key} {value:,.2f}" for key, value in deletes[name][-1].items()),
                            file=sys.stderr, flush=True)
            finally:
                await producer.stop()
                await untimed_pool.close()

    lines = {"seeded": f"{made:,} memberships, {args.history:,} history rows, {args.users:,} users " + (
        f"in {seeded / 60:.1f} min (COPY)" if seeded is not None else "(reused, seeded by an earlier run)")}
    if migrated:
        lines[f"migrations {migrated['applied'][0]} to {migrated['applied'][-1]}"] = (
            f"{migrated['seconds']:.1f} s; longest write meanwhile {migrated['longest write']:.2f} s (idle "
            f"{migrated['idle write']:.2f} s; target < 1 s); longest lock blocking writes: {migrated['lock']}")
    for table, label in (("memberships", "membership"), ("membership_history", "history row")) if sizes else ():
        total, heap, bare = sizes["full"][table]
        lines[f"storage a {label}"] = (f"{total:.0f} bytes with indexes, {heap:.0f} table only, bare tuple {bare:.0f} "
                                       f"({total / bare:.1f}x); baseline {sizes['baseline'][table][0]:.0f} bytes")
    for kind in ("uniform", "zipf") if reads else ():
        full, base = reads[("full", kind)], reads[("baseline", kind)]
        lines[f"hot read, {kind} users"] = (
            f"{spread([r['rps'] for r in full])} req/s, p99 {spread([r['p99'] for r in full], '{:.1f}')} ms, "
            f"{spread([1e6 / r['cpu_us'] for r in full])} requests a CPU second")
        lines[f"hot read, {kind}: full / baseline"] = (
            f"{spread([f['rps'] / b['rps'] for f, b in zip(full, base, strict=True)], '{:.1%}')} of the rate "
            f"(target >= 80%), p99 {spread([f['p99'] / b['p99'] for f, b in zip(full, base, strict=True)], '{:.2f}')}x")
    if expired:
        lines[f"expiry of {args.expiring:,} due in one minute"] = (
            f"worker {spread(expired['worker'])} rows/s, limit {spread(expired['limit'])} rows/s, ratio "
            f"{spread([w / m for w, m in zip(expired['worker'], expired['limit'], strict=True)], '{:.0%}')} "
            f"(target >= 50%); read p99 at {args.read_rate} reads/s draining {spread(expired['during'], '{:.1f}')} "
            f"ms, idle {spread(expired['idle'], '{:.1f}')} ms, "
            f"{spread([d / i for d, i in zip(expired['during'], expired['idle'], strict=True)], '{:.2f}')}x "
            f"(target < 2x)")
    for name, figures in reports.items():
        lines[f"all-users month report, {name}"] = (
            f"{figures['rows']:,} rows ({figures['explicit']:,} explicit, the rest from 2 rollout changes): "
            f"{spread(figures['api'])} rows/s, COPY {spread(figures['copy'])} rows/s, ratio "
            f"{spread([a / c for a, c in zip(figures['api'], figures['copy'], strict=True)], '{:.0%}')} "
            f"(target >= 50%), API peak RSS {spread(figures['peak'])} MB (target < 150 MB)")
    for target in targets_of_percent if percent else ():
        lines[f"percent change 10% -> 50%, {target}"] = (
            f"{spread(percent[(target, 'full')], '{:.3f}')} s at full size, "
            f"{spread(percent[(target, 'baseline')], '{:.3f}')} s at {BASELINE_USERS:,} users (target < 1 s)")
    for name, runs in deletes.items():
        lines[f"delete_segment of {args.deleted:,}, {name}"] = (
            f"outcome {spread([r['seconds'] for r in runs], '{:.1f}')} s, WAL "
            f"{spread([r['wal_mb'] for r in runs])} MiB; longest wait: segment commands behind it "
            f"{spread([r['segment wait'] for r in runs], '{:.2f}')} s (without a deletion "
            f"{spread([r['segment wait idle'] for r in runs], '{:.2f}')} s), user commands "
            f"{spread([r['user wait'] for r in runs], '{:.2f}')} s (without "
            f"{spread([r['user wait idle'] for r in runs], '{:.2f}')} s) (target: < 1 s behind it)")
    common.report(f"at scale ({args.users:,} users, {made:,} memberships over {args.segments:,} segments, "
                  f"{args.rollout_segments} with a rollout, {args.history:,} history rows; baseline "
                  f"{BASELINE_USERS:,} users; wrk 32 connections, {args.duration} s)", lines)


def cli() -> None:
    common.cli(__doc__, main, rounds=3,
               users=(1_000_000, "registered users (full size: 10,000,000)"),
               memberships=(5_000_000, "explicit memberships (full size: 50,000,000)"),
               segments=(1_000, "segments"), rollout_segments=(100, "segments with a rollout"),
               history=(3_000_000, "history rows over the last 3 months (full size: 30,000,000)"),
               deleted=(200_000, "explicit members of each deleted segment (full size: 2,000,000)"),
               duration=(10, "seconds of wrk a hot-read figure, and of the idle reads with `expiry`"),
               workers=(2, "API worker processes"),
               expiring=(100_000, "memberships due in the same minute, with `expiry` (full size: 1,000,000)"),
               read_rate=(200, "reads a second timed during the expiry rounds"),
               reuse=("", "the URL of a full-size database an earlier run seeded (printed by it): measured "
                          "again without seeding (not `migrate`; `delete` only while its segments are left)"),
               idle_probes=(30, "seconds of the deletion rounds' commands sent before each deletion, and after"),
               measures=(",".join(MEASURES), f"which figures, comma-separated, of: {', '.join(MEASURES)}"),
               migrate_from=("0010_segment_member_counts",
                             "with `migrate`: the first migration applied while measured"))


if __name__ == "__main__":
    cli()
