"""Migrations applied to a full-size database while a writer keeps writing: how long writes
wait, and the longest a lock that blocks them is held."""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg

from shared.db import apply_migrations

# Lock modes that block INSERT, UPDATE and DELETE (they conflict with ROW EXCLUSIVE).
WRITE_BLOCKING = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")


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
