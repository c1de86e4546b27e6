"""The data set: segments with Zipf-like sizes, users, memberships and history made by the
server and loaded with COPY, and what a row costs on disk."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator

import asyncpg

from bench import common
from bench.common import Progress
from services.expiry_worker import member_counts


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
