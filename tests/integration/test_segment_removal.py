"""Deleting a segment with more explicit members than a chunk: the segment is gone for reads and
commands at once, the commands behind the deletion in its partition go on, the members leave in
chunks, and the outcome comes with the last one. Across a crash in the middle, every member
leaves exactly once and the outcome is stored and published once."""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.command_consumer.bootstrap import build_consumer
from shared.kafka import kafka_options
from tests.support import Publisher, read_topic, rows_locked, running_consumer, wait_for_count, wait_for_outcomes

pytestmark = pytest.mark.integration
MEMBERS = 2_500
EXPIRED = 100  # of them, past their expiry when the segment is deleted (they leave at their expiry)


async def seed_members(pool: asyncpg.Pool, slug: str, members: int = MEMBERS, expired: int = EXPIRED) -> int:
    segment = await pool.fetchval("SELECT id FROM segments WHERE slug = $1 AND deleted_at IS NULL", slug)
    await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g ON CONFLICT DO NOTHING",
                       members)
    await pool.execute("""INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
                          SELECT g, $1, now() - interval '1 day',
                                 CASE WHEN g <= $3 THEN now() - interval '1 hour' END
                          FROM generate_series(1, $2) AS g""", segment, members, expired)
    return segment


async def check_left_once(pool: asyncpg.Pool, slug: str, command_id: str, members: int = MEMBERS,
                          expired: int = EXPIRED) -> None:
    rows = await pool.fetch("SELECT user_id, reason, command_id, executed_at, expires_at FROM membership_history "
                            "WHERE segment_slug = $1 AND operation = 'D'", slug)
    assert sorted(row["user_id"] for row in rows) == list(range(1, members + 1))  # each exactly once
    deleted_at = await pool.fetchval("SELECT deleted_at FROM segments WHERE slug = $1", slug)
    for row in rows:
        if row["user_id"] <= expired:
            assert (row["reason"], row["command_id"], row["executed_at"]) == ("ttl", None, row["expires_at"])
        else:
            assert (row["reason"], row["command_id"], row["executed_at"]) == ("segment_deleted", command_id, deleted_at)
    assert await pool.fetchval("SELECT count(*) FROM memberships m JOIN segments s ON s.id = m.segment_id "
                               "WHERE s.slug = $1", slug) == 0
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = $1", command_id) == 1
    assert await pool.fetchval("SELECT count(*) FROM segment_removals") == 0


async def test_a_large_segment_leaves_in_chunks_while_the_commands_behind_it_go_on(settings, pool, api):
    settings = settings.model_copy(update={"consumer_segment_removal_chunk": 200})
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "BIG", "command_id": "big"})
        await wait_for_outcomes(pool, ["big"])
        segment = await seed_members(pool, "BIG")
        # A member's row locked, as a long transaction would: the removal's chunk that reaches it waits.
        async with rows_locked(settings, "SELECT 1 FROM memberships WHERE user_id = 2000 AND segment_id = $1 "
                                         "FOR UPDATE", segment):
            deleting = await publish.segment({"type": "delete_segment", "slug": "BIG", "command_id": "del-big"})
            # Behind it in its partition (same key): a segment command and the same deletion again.
            await publish.raw(settings.segments_commands_topic, {"type": "create_segment", "slug": "NEXT",
                                                                 "command_id": "next"}, key="BIG")
            await publish.segment({"type": "delete_segment", "slug": "BIG", "command_id": "del-big"})
            await wait_for_outcomes(pool, ["next"])
            # The chunks before the locked row go on in their own transactions; the outcome waits for the last.
            await wait_for_count(pool, "SELECT coalesce(max(removed), 0) FROM segment_removals "
                                       "WHERE command_id = 'del-big'", 1)
            assert await pool.fetchval("SELECT status FROM command_outcomes WHERE command_id = 'del-big'") is None
            # Gone for reads and commands already: a user still holding its row is not in it.
            read = await api.get("/users/2400/segments")
            assert read.status_code == 200 and "BIG" not in read.text
            await publish.user({"type": "update_user_segments", "user_id": 2400, "add": ["BIG"],
                                "command_id": "add-big"})
            refused = await wait_for_outcomes(pool, ["add-big"])
            assert refused["add-big"]["status"] == "rejected"
        outcome = (await wait_for_outcomes(pool, ["del-big"]))["del-big"]
        assert outcome["status"] == "applied"
        assert outcome["result"] == {"slug": "BIG", "explicit_members_removed": MEMBERS}
        await check_left_once(pool, "BIG", "del-big")
    # Its offset was held until then; now the partition's commit passes it (the stop flushed it).
    assert await committed(settings, TopicPartition(deleting.topic, deleting.partition)) > deleting.offset
    published = [orjson.loads(r.value) for r in await read_topic(settings, settings.results_topic, sys.maxsize,
                                                                   quiet=2.0)]
    assert [o["status"] for o in published if o["command_id"] == "del-big"] == ["applied"]  # once, when done


async def committed(settings, tp: TopicPartition) -> int | None:
    reader = AIOKafkaConsumer(**kafka_options(settings), group_id=settings.consumer_group, enable_auto_commit=False)
    await reader.start()
    try:
        return await reader.committed(tp)
    finally:
        await reader.stop()


async def test_a_crash_in_the_middle_of_a_removal_leaves_no_partial_or_doubled_effect(settings, pool):
    settings = settings.model_copy(update={"consumer_segment_removal_chunk": 100})
    async with Publisher(settings) as publish:
        async with running_consumer(settings, pool):
            await publish.segment({"type": "create_segment", "slug": "HUGE", "command_id": "huge"})
            await wait_for_outcomes(pool, ["huge"])
        segment = await seed_members(pool, "HUGE", members=6_000)
        consumer = build_consumer(settings, pool)
        running = asyncio.create_task(consumer.run())
        # The chunk that reaches user 3,000 waits on its row: the process dies with that chunk in flight.
        async with rows_locked(settings, "SELECT 1 FROM memberships WHERE user_id = 3000 AND segment_id = $1 "
                                         "FOR UPDATE", segment):
            deleting = await publish.segment({"type": "delete_segment", "slug": "HUGE", "command_id": "del-huge"})
            await publish.raw(settings.segments_commands_topic, {"type": "create_segment", "slug": "AFTER",
                                                                 "command_id": "after"}, key="HUGE")
            await wait_for_outcomes(pool, ["after"])
            await wait_for_count(pool, "SELECT removed FROM segment_removals", 2_900)
            await asyncio.sleep(0.3)  # the next chunk is waiting for the lock
            running.cancel()  # abandoned as by a crash: nothing in hand finishes, no offset is flushed
            await asyncio.gather(running, return_exceptions=True)
        tp = TopicPartition(deleting.topic, deleting.partition)
        assert await committed(settings, tp) <= deleting.offset  # held: the deletion comes again
        partial = await pool.fetchval("SELECT removed FROM segment_removals WHERE command_id = 'del-huge'")
        assert partial == 3_000  # whole chunks only, the one in flight rolled back
        assert await pool.fetchval("SELECT count(*) FROM membership_history WHERE segment_slug = 'HUGE' "
                                   "AND operation = 'D'") == partial
        async with running_consumer(settings, pool):
            outcome = (await wait_for_outcomes(pool, ["del-huge"], timeout=60))["del-huge"]
    assert outcome["result"] == {"slug": "HUGE", "explicit_members_removed": 6_000}
    await check_left_once(pool, "HUGE", "del-huge", members=6_000)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = 'after'") == 1
    # Published when stored, and again if the redelivered command came after that (at-least-once
    # outcome): every copy is the one stored outcome, each with the token of its publication.
    published = [orjson.loads(r.value) for r in await read_topic(settings, settings.results_topic, sys.maxsize,
                                                                   quiet=2.0)]
    copies = [o for o in published if o["command_id"] == "del-huge"]
    for copy in copies:
        copy.pop("consistency_token")
    assert copies and all(copy == copies[0] for copy in copies)
    assert copies[0]["result"] == {"slug": "HUGE", "explicit_members_removed": 6_000}


async def test_a_chunk_of_0_removes_every_member_in_the_deleting_transaction(settings, pool):
    settings = settings.model_copy(update={"consumer_segment_removal_chunk": 0})
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "WHOLE", "command_id": "whole"})
        await wait_for_outcomes(pool, ["whole"])
        await seed_members(pool, "WHOLE")
        await publish.segment({"type": "delete_segment", "slug": "WHOLE", "command_id": "del-whole"})
        outcome = (await wait_for_outcomes(pool, ["del-whole"]))["del-whole"]
        assert outcome["result"] == {"slug": "WHOLE", "explicit_members_removed": MEMBERS}
        # Every member left in the transaction that marked the segment deleted.
        deleting = await pool.fetchval("SELECT xmin::text FROM segments WHERE slug = 'WHOLE'")
        assert {row["xmin"] for row in await pool.fetch(
            "SELECT DISTINCT xmin::text FROM membership_history WHERE segment_slug = 'WHOLE' AND operation = 'D'")
        } == {deleting}
        await check_left_once(pool, "WHOLE", "del-whole")
