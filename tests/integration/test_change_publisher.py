"""The membership-changes stream against a real broker and PostgreSQL: every change recorded in
history, whatever made it, is one event with the id of its row; rolled-back changes are never
published; one publisher is active at a time; a replay queues old changes ahead of live ones."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from devstack.embedded import EmbeddedKafka
from services.change_publisher.publisher import FAILURES, LAG, OLDEST, PUBLISHED, ChangePublisher
from services.change_publisher.replay import replay
from services.expiry_worker.worker import expire_batch
from shared.changes import ID_HEADER, KIND_HEADER, MembershipChange, RolloutChange, decode
from shared.client import ChangeReader
from shared.kafka import create_producer, ensure_topics
from shared.rollout import rollout_bucket
from tests.support import Publisher, create_segments, header, read_topic, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running_publisher(settings, **options):
    producer = create_producer(settings)
    await producer.start()
    publisher = ChangePublisher(functools.partial(asyncpg.connect, settings.database_url), producer,
                                settings.membership_changes_topic, poll_interval=0.01, **options)
    task = asyncio.create_task(publisher.run())
    try:
        yield publisher
    finally:
        publisher.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()


def milliseconds(moment: datetime | None) -> datetime | None:
    """A time as events carry it (the contract's format has milliseconds)."""
    return moment and moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def outbox_empty(pool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await pool.fetchval("SELECT count(*) FROM membership_changes_outbox"):
        assert time.monotonic() < deadline, "the outbox was not drained"
        await asyncio.sleep(0.02)


async def published(settings, count: int) -> list:
    records = await read_topic(settings, settings.membership_changes_topic, count)
    assert len(records) == count, f"{len(records)} of {count} events on the topic"
    return records


async def test_every_recorded_change_is_one_event_with_its_rows_id(settings, pool):
    command = functools.partial(dict)
    async with Publisher(settings) as publish, running_consumer(settings, pool), running_publisher(settings):
        await create_segments(publish, pool, [
            command(type="create_segment", command_id="s1", slug="VOICE", percent=10),
            command(type="create_segment", command_id="s2", slug="TRIAL")])
        user_commands = [
            command(type="update_user_segments", command_id="u1", user_id=1, add=["TRIAL"], ttl_seconds=1),
            command(type="update_user_segments", command_id="u2", user_id=2, add=["TRIAL", "VOICE"]),
            command(type="update_user_segments", command_id="u3", user_id=2, remove=["VOICE"]),
            command(type="update_user_segments", command_id="u4", user_id=3, add=["TRIAL"]),
        ]
        for item in user_commands:
            await publish.user(item)
        await wait_for_outcomes(pool, [c["command_id"] for c in user_commands])
        await asyncio.sleep(1.1)  # user 1's TTL passes: the expiry worker records the exit
        async with pool.acquire() as conn:
            assert (await expire_batch(conn, 100)).removed == 1
        await create_segments(publish, pool, [
            command(type="update_segment", command_id="s3", slug="VOICE", percent=30),
            command(type="delete_segment", command_id="s4", slug="TRIAL")])  # removes users 2 and 3
        await outbox_empty(pool)

    history = await pool.fetch("SELECT * FROM membership_history ORDER BY id")
    rollouts = await pool.fetch("SELECT * FROM rollout_events ORDER BY id")
    assert {row["reason"] for row in history} == {"manual", "ttl", "segment_deleted"} and len(rollouts) == 2
    records = await published(settings, len(history) + len(rollouts))
    events = {decode(record.value).event_id: (record, decode(record.value)) for record in records}
    assert len(events) == len(records)  # no duplicates in a run without crashes

    for row in history:
        record, event = events[f"membership-{row['id']}"]
        assert isinstance(event, MembershipChange)
        assert record.key == str(row["user_id"]).encode()
        assert header(record, KIND_HEADER) == "membership" and header(record, ID_HEADER) == event.event_id
        assert (event.user_id, event.segment, event.operation, event.source, event.reason, event.executed_at,
                event.command_id, event.expires_at) == (
            row["user_id"], row["segment_slug"], row["operation"], row["source"], row["reason"],
            milliseconds(row["executed_at"]), row["command_id"], milliseconds(row["expires_at"]))
    ttl_entry = next(e for _, e in events.values() if e.kind == "membership" and e.command_id == "u1")
    ttl_exit = next(e for _, e in events.values() if e.kind == "membership" and e.reason == "ttl")
    assert ttl_entry.expires_at is not None and ttl_exit.expires_at == ttl_entry.expires_at
    assert ttl_exit.command_id is None and ttl_exit.executed_at == ttl_entry.expires_at
    assert {e.user_id for _, e in events.values() if e.kind == "membership" and e.reason == "segment_deleted"} \
        == {2, 3}

    created, changed = (events[f"rollout-{row['id']}"][1] for row in rollouts)
    assert isinstance(changed, RolloutChange)
    assert (created.from_percent, created.to_percent, created.buckets_entered, created.buckets_left) \
        == (0, 10, (0, 1000), None)
    assert (changed.reason, changed.command_id, changed.buckets_entered) == ("percent_changed", "s3", (1000, 3000))
    assert events[f"rollout-{rollouts[1]['id']}"][0].key == b"segment:VOICE"
    # A reader applies the bucket rule: user 2 was explicitly removed from VOICE and stays out.
    moved = [u for u in range(1, 200) if changed.moves(rollout_bucket("VOICE", u)) == "I"]
    assert moved and all(1000 <= rollout_bucket("VOICE", u) < 3000 for u in moved)

    by_user = {}
    for record in records:  # per key, in the order of the topic's partition
        event = decode(record.value)
        if event.kind == "membership":
            by_user.setdefault(event.user_id, []).append(int(event.event_id.split("-")[1]))
    assert all(ids == sorted(ids) for ids in by_user.values()), by_user


async def test_a_change_rolled_back_is_never_published(settings, pool):
    async with running_publisher(settings):
        conn = await asyncpg.connect(settings.database_url)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason, command_id) VALUES (7, 'X', 'I', now(), 'manual', 'manual', 'gone')")
            await asyncio.sleep(0.3)  # the publisher polls meanwhile: an uncommitted row is not visible
            await transaction.rollback()
            await conn.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason, command_id) VALUES (8, 'X', 'I', now(), 'manual', 'manual', 'kept')")
        finally:
            await conn.close()
        await outbox_empty(pool)
    records = await read_topic(settings, settings.membership_changes_topic, 2, timeout=3)
    assert [decode(record.value).command_id for record in records] == ["kept"]


async def test_one_publisher_is_active_and_another_takes_over(settings, pool):
    async with running_publisher(settings, standby_retry=0.1) as first:
        await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                           "reason) VALUES (1, 'X', 'I', now(), 'manual', 'manual')")
        await outbox_empty(pool)
        async with running_publisher(settings, standby_retry=0.1) as second:
            locks = await pool.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            assert locks == 1
            first.stop()
            await asyncio.sleep(0.5)
            await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason) VALUES (2, 'X', 'I', now(), 'manual', 'manual')")
            await outbox_empty(pool)
            assert not second.stopping.is_set()
    records = await published(settings, 2)
    assert sorted(decode(record.value).user_id for record in records) == [1, 2]


async def test_the_feed_turned_off_queues_nothing(settings, pool):
    conn = await asyncpg.connect(settings.database_url, server_settings={"segmentation.membership_changes": "off"})
    try:
        await conn.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                           "reason) VALUES (1, 'X', 'I', now(), 'manual', 'manual')")
    finally:
        await conn.close()
    assert await pool.fetchval("SELECT count(*) FROM membership_changes_outbox") == 0
    await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                       "reason) VALUES (2, 'X', 'I', now(), 'manual', 'manual')")
    assert await pool.fetchval("SELECT count(*) FROM membership_changes_outbox") == 1


async def test_replay_publishes_old_changes_first_with_their_ids(settings, pool):
    now = datetime.now(UTC)
    old = [(user_id, now - timedelta(days=40 - user_id)) for user_id in range(1, 6)]
    conn = await asyncpg.connect(settings.database_url, server_settings={"segmentation.membership_changes": "off"})
    try:  # changes recorded before the stream existed
        await conn.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason) VALUES ($1, 'OLD', 'I', $2, 'manual', 'manual')", old)
        segment_id = await conn.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                         "VALUES ('OLD', 5, now(), now()) RETURNING id")
        await conn.execute("INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason, "
                           "executed_at, command_id) VALUES ($1, 'OLD', 0, 5, 'created', $2, 'r')",
                           segment_id, now - timedelta(days=38, hours=12))  # before the start: not replayed
    finally:
        await conn.close()
    await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                       "reason) VALUES (99, 'LIVE', 'I', now(), 'manual', 'manual')")  # waiting, not yet sent
    async with pool.acquire() as conn:
        queued = await replay(conn, now - timedelta(days=37, hours=12), now + timedelta(minutes=1))
    assert queued == 3 + 1  # and the live row's own history row, recorded after the start
    order = await pool.fetch("SELECT user_id FROM membership_changes_outbox, unnest(user_ids) WITH ORDINALITY "
                             "AS change(user_id, position) ORDER BY seq, position")
    assert [row["user_id"] for row in order] == [3, 4, 5, 99, 99]  # in the report's order, ahead of the live one
    async with running_publisher(settings):
        await outbox_empty(pool)
    events = [decode(record.value) for record in await published(settings, 5)]
    assert {e.user_id for e in events} == {3, 4, 5, 99}
    live_ids = [e.event_id for e in events if e.user_id == 99]
    assert len(live_ids) == 2 and len(set(live_ids)) == 1  # replayed and live: one id, a duplicate readers drop


async def test_a_batch_takes_whole_statements_until_it_holds_the_batch_size(settings, pool):
    for users in ([1], [2, 3, 4, 5, 6], [7]):  # three statements: 1, 5 and 1 changes
        await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                           "reason) SELECT u, 'X', 'I', now(), 'manual', 'manual' FROM unnest($1::bigint[]) AS u",
                           users)
    assert await pool.fetchval("SELECT count(*) FROM membership_changes_outbox") == 3
    batches: list[int] = []
    async with running_publisher(settings, batch_size=2, on_published=lambda lags: batches.append(len(lags))):
        await outbox_empty(pool)
    assert batches == [6, 1]  # the first entry and the second (it starts below 2), then the third
    events = [decode(record.value) for record in await published(settings, 7)]
    assert sorted(event.user_id for event in events) == list(range(1, 8))


def sample(counter, label: str) -> float:
    return counter.labels(label)._value.get()


async def insert_history(pool, users: list[int], segment: str = "X") -> None:
    """One statement's entries, as a batch writes them."""
    await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                       "reason) SELECT u, $2, 'I', now(), 'manual', 'manual' FROM unnest($1::bigint[]) AS u",
                       users, segment)


async def test_changes_made_while_the_broker_is_away_wait_and_are_published_when_it_is_back(settings, pool):
    broker = EmbeddedKafka()  # one this test may freeze: SIGSTOP, as a broker that stops answering
    await asyncio.to_thread(broker.start)
    try:
        own = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
        await ensure_topics(own)
        async with running_publisher(own):
            await insert_history(pool, [1])
            await outbox_empty(pool)
            published_before, lags_before = sample(PUBLISHED, "membership"), LAG._sum.get()
            failures_before = sample(FAILURES, "kafka")
            broker.process.send_signal(signal.SIGSTOP)
            try:
                await insert_history(pool, [2, 3, 4])
                await asyncio.sleep(12)  # past the producer's request timeout: the send fails and is retried
                assert await pool.fetchval("SELECT sum(changes) FROM membership_changes_outbox") == 3
                # What operators see meanwhile: the oldest change waiting, and the failed sends.
                assert OLDEST._value.get() > 10 and sample(FAILURES, "kafka") > failures_before
            finally:
                broker.process.send_signal(signal.SIGCONT)
            await outbox_empty(pool, timeout=90)
            await asyncio.sleep(0.1)
            assert OLDEST._value.get() == 0 and sample(PUBLISHED, "membership") >= published_before + 3
            assert LAG._sum.get() - lags_before > 3 * 10  # each of the three waited out the freeze
        records = await read_topic(own, own.membership_changes_topic, 10, timeout=10)
        events = {decode(record.value).event_id: decode(record.value) for record in records}
        assert sorted(event.user_id for event in events.values()) == [1, 2, 3, 4]  # copies share their id
    finally:
        await asyncio.to_thread(broker.stop)


async def test_the_change_reader_filters_and_yields_a_change_published_twice_once(settings, pool):
    await insert_history(pool, [1, 2], "A")
    await insert_history(pool, [1], "B")
    async with running_publisher(settings):
        await outbox_empty(pool)
        async with pool.acquire() as conn:  # the same changes queued again: published twice
            hour = timedelta(hours=1)
            assert await replay(conn, datetime.now(UTC) - hour, datetime.now(UTC) + hour) == 3
        await outbox_empty(pool)
    assert len(await published(settings, 6)) == 6

    async def read(**filters) -> list:
        found = []
        async with ChangeReader(settings, from_beginning=True, **filters) as changes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    async for change in changes:
                        found.append(change)
        return found

    assert len({change.event_id for change in await read()}) == len(await read()) == 3
    assert sorted((c.user_id, c.segment) for c in await read(user_id=1)) == [(1, "A"), (1, "B")]
    assert sorted(c.user_id for c in await read(segment="A")) == [1, 2]
    assert await read(since=datetime.now(UTC) + timedelta(minutes=5)) == []
