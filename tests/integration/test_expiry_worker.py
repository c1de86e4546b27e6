"""The expiry worker on the real database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from services.expiry_worker.worker import BACKLOG_COUNTED_BATCHES, EXPIRE_SQL, ExpiryWorker, expire_batch
from shared.rollout import rollout_bucket

pytestmark = pytest.mark.integration


async def seed(pool, count: int, expires_at: datetime, slug: str = "A", percent: float = 0) -> int:
    segment_id = await pool.fetchval(
        "INSERT INTO segments (slug, percent, created_at, updated_at) VALUES ($1, $2, now(), now()) RETURNING id",
        slug, percent)
    await pool.execute(
        "INSERT INTO memberships SELECT g, $1, now(), $2 FROM generate_series(1, $3) AS g", segment_id,
        expires_at, count)
    return segment_id


async def ttl_history(pool) -> list[tuple]:
    rows = await pool.fetch("SELECT user_id, segment_slug, operation, executed_at, source, reason "
                            "FROM membership_history ORDER BY user_id")
    return [tuple(r) for r in rows]


async def test_expired_memberships_leave_at_their_exact_expiry(pool):
    expired_at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    await seed(pool, 3, expired_at)
    async with pool.acquire() as conn:
        result = await expire_batch(conn, 100)
    assert result.removed == 3 and not result.full
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    assert await ttl_history(pool) == [(u, "A", "D", expired_at, "manual", "ttl") for u in (1, 2, 3)]


async def test_memberships_not_yet_due_stay(pool):
    await seed(pool, 5, datetime.now(UTC) + timedelta(hours=1))
    async with pool.acquire() as conn:
        assert (await expire_batch(conn, 100)).removed == 0
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 5


async def test_a_user_still_covered_by_the_rollout_records_no_exit(pool):
    expired_at = datetime.now(UTC) - timedelta(seconds=1)
    await seed(pool, 200, expired_at, slug="HALF", percent=50)
    async with pool.acquire() as conn:
        await expire_batch(conn, 1000)
    left = {row[0] for row in await ttl_history(pool)}
    assert left == {u for u in range(1, 201) if rollout_bucket("HALF", u) >= 5000}
    assert 0 < len(left) < 200


async def test_rows_fallen_due_since_the_last_analyze_are_removed_by_address(pool):
    """Statistics gathered while nothing was due (a campaign's memberships all ending in the same
    minute, too few of the table to trigger an analyze) must not lead the planner to find each
    batch's locked rows by reading every due row: a backlog would cost its square."""
    segment_id = await seed(pool, 20_000, datetime.now(UTC) + timedelta(days=30))
    await pool.execute("ANALYZE memberships")
    await pool.execute("INSERT INTO memberships SELECT g, $1, now(), now() - interval '1 minute' "
                       "FROM generate_series(100001, 120000) AS g", segment_id)
    async with pool.acquire() as conn:
        plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + EXPIRE_SQL, 1000))
        assert "Tid Scan on memberships m" in plan, plan
        assert (await expire_batch(conn, 1000)).removed == 1000
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE expires_at <= now()") == 19_000


async def test_the_backlog_is_counted_up_to_a_few_batches(pool):
    """A backlog is counted exactly while it is small; a large one reads as the cap, not as a
    scan of every due row every few seconds of its drain."""
    await seed(pool, 25, datetime.now(UTC) - timedelta(minutes=1))
    async with pool.acquire() as conn:
        await ExpiryWorker(pool, batch_size=10, max_sleep_seconds=1)._now_and_then(conn)
        assert REGISTRY.get_sample_value("segmentation_expiry_backlog") == 25
        await ExpiryWorker(pool, batch_size=2, max_sleep_seconds=1)._now_and_then(conn)
        assert REGISTRY.get_sample_value("segmentation_expiry_backlog") == 2 * BACKLOG_COUNTED_BATCHES


async def test_two_workers_on_one_backlog_remove_each_row_once(pool):
    await seed(pool, 3000, datetime.now(UTC) - timedelta(seconds=5))
    workers = [ExpiryWorker(pool, batch_size=100, max_sleep_seconds=0.05) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for _ in range(200):
            if await pool.fetchval("SELECT count(*) FROM memberships") == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks)
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    assert await pool.fetchval("SELECT count(*) FROM membership_history") == 3000
    assert await pool.fetchval("SELECT count(DISTINCT user_id) FROM membership_history") == 3000


async def test_ttl_extended_or_made_permanent_before_expiry_is_not_removed(pool):
    soon = datetime.now(UTC) + timedelta(milliseconds=500)
    segment_id = await seed(pool, 2, soon)
    await pool.execute("UPDATE memberships SET expires_at = now() + interval '1 hour' WHERE user_id = 1")
    await pool.execute("UPDATE memberships SET expires_at = NULL WHERE user_id = 2")
    await asyncio.sleep(0.6)
    async with pool.acquire() as conn:
        assert (await expire_batch(conn, 100)).removed == 0
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE segment_id = $1", segment_id) == 2


async def test_a_row_locked_by_a_concurrent_extension_is_skipped_then_kept(pool):
    await seed(pool, 1, datetime.now(UTC) - timedelta(seconds=1))
    async with pool.acquire() as writer, writer.transaction():
        # The command consumer holds the row while it re-adds the segment with a new TTL.
        await writer.execute("SELECT 1 FROM memberships WHERE user_id = 1 FOR UPDATE")
        async with pool.acquire() as conn:
            assert (await expire_batch(conn, 100)).removed == 0  # skipped, not waited on
        await writer.execute("UPDATE memberships SET expires_at = now() + interval '1 day' WHERE user_id = 1")
    async with pool.acquire() as conn:
        assert (await expire_batch(conn, 100)).removed == 0
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 1
    assert await pool.fetchval("SELECT count(*) FROM membership_history") == 0


async def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(pool, settings):
    total = 60_000
    await seed(pool, total, datetime.now(UTC) - timedelta(seconds=1))
    env = {**os.environ, "DATABASE_URL": settings.database_url, "EXPIRY_BATCH_SIZE": "20000",
           "EXPIRY_METRICS_PORT": "0"}

    def start():
        return subprocess.Popen([sys.executable, "-m", "services.expiry_worker"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    worker = start()
    try:
        for _ in range(2000):  # until the first batch is under way
            if await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%WITH due AS%' "
                                   "AND state = 'active' AND pid <> pg_backend_pid()"):
                break
            await asyncio.sleep(0.005)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        after_kill = await pool.fetchval("SELECT count(*) FROM memberships")
        assert after_kill > 0  # the kill landed before the backlog was done
        worker = start()
        for _ in range(600):
            if await pool.fetchval("SELECT count(*) FROM memberships") == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0  # SIGTERM: finishes the batch in hand and exits cleanly
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    assert await pool.fetchval("SELECT count(*) FROM membership_history") == total
    assert await pool.fetchval("SELECT count(DISTINCT user_id) FROM membership_history") == total


async def _run_until_empty(pool, worker: ExpiryWorker, within: float) -> bool:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(within):
            while await pool.fetchval("SELECT count(*) FROM memberships"):  # noqa: ASYNC110 - another task's writes
                await asyncio.sleep(0.05)
        return True
    except TimeoutError:
        return False
    finally:
        worker.stop()
        await task


async def test_the_worker_wakes_for_the_next_known_expiry(pool):
    await seed(pool, 3, datetime.now(UTC) + timedelta(seconds=1))
    # A fixed 30 s interval would miss the 6 s deadline; sleeping until the expiry does not.
    worker = ExpiryWorker(pool, batch_size=100, max_sleep_seconds=30)
    assert await _run_until_empty(pool, worker, within=6)
