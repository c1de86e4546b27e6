"""Each segment's explicit member count kept as memberships change (migration 0010): equal to
counting the rows, whatever changed them (commands, expiry, a segment's deletion, a hand fix),
before and after the expiry worker folds the changes into one row per segment."""

from __future__ import annotations

import asyncio

import pytest

from services.expiry_worker import member_counts
from services.expiry_worker.worker import ExpiryWorker
from tests.support import Publisher, running_consumer, wait_for_count, wait_for_outcomes

pytestmark = pytest.mark.integration


async def kept_and_counted(pool) -> tuple[dict[int, int], dict[int, int]]:
    kept = {row["segment_id"]: row["n"] for row in await pool.fetch(
        "SELECT segment_id, sum(members) AS n FROM segment_member_counts GROUP BY 1 HAVING sum(members) <> 0")}
    counted = {row["segment_id"]: row["n"] for row in await pool.fetch(
        "SELECT segment_id, count(*) AS n FROM memberships GROUP BY 1")}
    return kept, counted


async def test_member_counts_follow_every_change_and_survive_folding(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await publish.segment({"type": "create_segment", "slug": "B", "command_id": "b"})
        await wait_for_outcomes(pool, ["a", "b"])
        adds = [{"type": "update_user_segments", "user_id": u, "add": ["A", "B"] if u <= 10 else ["A"],
                 "command_id": f"add-{u}", **({"ttl_seconds": 1} if u > 25 else {})} for u in range(1, 31)]
        await publish.users(adds)
        await wait_for_outcomes(pool, [c["command_id"] for c in adds])
        again = [{"type": "update_user_segments", "user_id": u, "add": ["A"], "command_id": f"again-{u}"}
                 for u in range(1, 6)]  # already members: upserts, no new member
        removes = [{"type": "update_user_segments", "user_id": u, "remove": ["A"], "command_id": f"rm-{u}"}
                   for u in range(6, 11)]
        await publish.users(again + removes)
        await wait_for_outcomes(pool, [c["command_id"] for c in again + removes])
        kept, counted = await kept_and_counted(pool)
        assert kept == counted and sorted(counted.values()) == [10, 25]

        await asyncio.sleep(1.2)  # the five TTL memberships are due
        worker = ExpiryWorker(pool, batch_size=100, max_sleep_seconds=0.05)
        running = asyncio.create_task(worker.run())
        await wait_for_count(pool, "SELECT count(*) FROM membership_history WHERE reason = 'ttl'", 5)
        worker.stop()
        await running
        await publish.segment({"type": "delete_segment", "slug": "B", "command_id": "del-b"})
        await wait_for_outcomes(pool, ["del-b"])
    await pool.execute("DELETE FROM memberships WHERE user_id = 1")  # a hand fix counts too
    kept, counted = await kept_and_counted(pool)
    assert kept == counted and list(counted.values()) == [19]  # A: 25, less 5 expired, less the hand fix

    rows_before = await pool.fetchval("SELECT count(*) FROM segment_member_counts")
    async with pool.acquire() as conn:
        await member_counts.fold(conn)
        await member_counts.fold(conn)  # folding a folded table changes nothing
    assert rows_before > 2
    assert await pool.fetch("SELECT segment_id, members FROM segment_member_counts") == [
        (segment_id, n) for segment_id, n in counted.items()]  # one row for A; B's zero is gone
    assert await kept_and_counted(pool) == (counted, counted)
