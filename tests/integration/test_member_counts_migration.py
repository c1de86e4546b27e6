"""Migration 0010 on a database that already holds memberships, with writers going on: the counts
it leaves are exact, and it holds no lock that blocks writers while it counts."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from devstack.infra import drop_database, fresh_database
from shared.db import apply_migrations

pytestmark = pytest.mark.integration
COUNTS = "0010_segment_member_counts"
SEGMENTS, MEMBERS = 10, 400_000
# Lock modes that block INSERT, UPDATE and DELETE (they conflict with ROW EXCLUSIVE).
WRITE_BLOCKING = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"]


@pytest.fixture
async def before_counts(infra):
    name = f"counts_{uuid.uuid4().hex[:12]}"
    url = await fresh_database(infra.database_url, name, migrated_before=COUNTS)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO segments (slug, percent, created_at, updated_at) "
                           "SELECT 'S' || g, 0, now(), now() FROM generate_series(1, $1) AS g", SEGMENTS)
        await conn.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                           "SELECT g, 1 + g % $1, now() FROM generate_series(1, $2) AS g", SEGMENTS, MEMBERS)
    finally:
        await conn.close()
    yield url
    await drop_database(infra.database_url, name)


async def test_counts_are_exact_with_writers_going_on_and_no_lock_held_while_counting(before_counts):
    url = before_counts
    stop = asyncio.Event()
    writes = 0
    seen_counting: list[list[str]] = []  # the write-blocking locks held each time the count was seen running

    async def write() -> None:
        """Users beyond the seeded ones join and leave segments, one statement each."""
        nonlocal writes
        conn = await asyncpg.connect(url)
        try:
            user = MEMBERS
            while not stop.is_set():
                user += 1
                await conn.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                                   "SELECT $1, g, now() FROM generate_series(1, $2) AS g", user, SEGMENTS)
                if user % 3 == 0:
                    await conn.execute("DELETE FROM memberships WHERE user_id = $1 AND segment_id <= 4", user - 1)
                writes += 1
        finally:
            await conn.close()

    async def watch() -> None:
        conn = await asyncpg.connect(url)
        try:
            while not stop.is_set():
                row = await conn.fetchrow(
                    "SELECT a.pid, array(SELECT l.mode FROM pg_locks l WHERE l.pid = a.pid AND l.granted "
                    "AND l.relation = 'memberships'::regclass AND l.mode = ANY($1::text[])) AS modes "
                    "FROM pg_stat_activity a WHERE a.state = 'active' AND a.pid <> pg_backend_pid() "
                    "AND a.query LIKE '%FROM memberships GROUP BY segment_id%'", WRITE_BLOCKING)
                if row:
                    seen_counting.append(list(row["modes"]))
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(write()), asyncio.create_task(watch())]
    try:
        await asyncio.sleep(0.2)  # writers running before it starts
        assert await asyncio.to_thread(apply_migrations, url, "0011") == [COUNTS]
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    assert writes > 10
    assert seen_counting, "the count ran too fast to be seen"
    assert all(modes == [] for modes in seen_counting), seen_counting[:3]
    conn = await asyncpg.connect(url)
    try:
        kept = dict(await conn.fetch("SELECT segment_id, sum(members) FROM segment_member_counts GROUP BY 1"))
        actual = dict(await conn.fetch("SELECT segment_id, count(*) FROM memberships GROUP BY 1"))
        assert kept == actual
    finally:
        await conn.close()
    # Applied again, as after a crash before it was recorded: nothing is counted twice.
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = $1", COUNTS)
        assert await asyncio.to_thread(apply_migrations, url, "0011") == [COUNTS]
        assert dict(await conn.fetch("SELECT segment_id, sum(members) FROM segment_member_counts GROUP BY 1")) == actual
    finally:
        await conn.close()
