"""The command consumer against the real broker and database."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY

from services.command_consumer.bootstrap import build_consumer
from services.command_consumer.consumer import CommandConsumer
from services.query_api.replicas import parse_lsn
from tests.support import (
    Publisher,
    header,
    history,
    memberships_locked,
    read_topic,
    running_consumer,
    segment_locked,
    wait_for_count,
    wait_for_outcomes,
)

pytestmark = pytest.mark.integration


async def test_create_segment_and_add_user_apply_with_history_and_outcomes(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "AVITO_VOICE_MESSAGES", "command_id": "s1",
                               "description": "voice"})
        await wait_for_outcomes(pool, ["s1"])
        await publish.user({"type": "update_user_segments", "user_id": 1000, "add": ["AVITO_VOICE_MESSAGES"],
                            "command_id": "u1", "actor": "support"},
                           headers=[("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
        outcomes = await wait_for_outcomes(pool, ["u1"])
    assert outcomes["u1"]["status"] == "applied"
    assert outcomes["u1"]["result"] == {"added": ["AVITO_VOICE_MESSAGES"], "removed": [], "unchanged": [],
                                        "expires_at": None}
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id = 1000") == 1
    assert await pool.fetchval("SELECT count(*) FROM users WHERE user_id = 1000") == 1
    assert await history(pool, 1000) == [(1000, "AVITO_VOICE_MESSAGES", "I", "manual", "manual")]

    results = {r.key.decode(): r for r in await read_topic(settings, settings.results_topic, 2)}
    result = results["u1"]
    body = orjson.loads(result.value)
    assert body["status"] == "applied" and body["type"] == "update_user_segments"
    assert body["source"]["topic"] == settings.assignments_commands_topic
    assert header(result, "command-id") == "u1"
    assert header(result, "command-type") == "update_user_segments"
    assert header(result, "status") == "applied"
    assert header(result, "traceparent") == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert header(results["s1"], "traceparent") is None


async def test_every_rejection_code(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "exists"})
        await publish.segment({"type": "update_segment", "slug": "NOPE", "percent": 5, "command_id": "upd"})
        await publish.segment({"type": "delete_segment", "slug": "NOPE", "command_id": "del"})
        await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A", "MISSING"],
                            "command_id": "missing"})
        await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A"], "remove": ["A"],
                            "command_id": "conflict"})
        outcomes = await wait_for_outcomes(pool, ["exists", "upd", "del", "missing", "conflict"])
    codes = {cid: (o["status"], o["error"]["code"]) for cid, o in outcomes.items()}
    assert codes == {
        "exists": ("rejected", "segment_exists"),
        "upd": ("rejected", "segment_not_found"),
        "del": ("rejected", "segment_not_found"),
        "missing": ("rejected", "segment_not_found"),
        "conflict": ("rejected", "conflicting_segments"),
    }
    assert "MISSING" in outcomes["missing"]["error"]["message"]
    # Atomic: the rejected adds changed nothing, not even the user registration.
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    assert await pool.fetchval("SELECT count(*) FROM users") == 0


INVALID_RECORDS = [
    (b"not json at all", "invalid_json"),
    (b"\xff\xfe\xfd", "invalid_json"),
    (b'"a string"', "not_an_object"),
    (b'{"type": "explode", "command_id": "bad-type"}', "unknown_type"),
    (b'{"type": "create_segment", "slug": "X"}', "wrong_topic"),
    (b'{"type": "update_user_segments", "user_id": "1", "command_id": "bad-field"}', "invalid_field"),
]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_invalid_records_go_to_the_dlq_and_the_partition_keeps_flowing(settings, pool):
    key = "77"  # one key: every record lands on the same partition, the valid one last
    dlq_before = {code: sample("segmentation_dlq_records_total", code=code) for _, code in INVALID_RECORDS}
    applied_before = sample("segmentation_commands_total", type="update_user_segments", status="applied")
    batches_before = sample("segmentation_consumer_batch_size_count")
    latencies = ("segmentation_command_latency_seconds", "segmentation_command_published_seconds")
    latency_before = {name: (sample(f"{name}_count"), sample(f"{name}_sum")) for name in latencies}
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])
        positions = []
        for value, _ in INVALID_RECORDS:
            positions.append(await publish.raw(settings.assignments_commands_topic, value, key=key,
                                               headers=[("traceparent", b"tp-1")]))
        await publish.raw(settings.assignments_commands_topic, b'{"type": "update_user_segments", '
                          b'"user_id": 77, "add": ["A"], "command_id": "valid-after"}', key=key)
        outcomes = await wait_for_outcomes(pool, ["valid-after"])
        dlq = await read_topic(settings, settings.dlq_topic, len(INVALID_RECORDS))
    assert outcomes["valid-after"]["status"] == "applied"
    assert len(dlq) == len(INVALID_RECORDS)
    by_offset = {int(header(r, "x-original-offset")): r for r in dlq}
    for (value, code), position in zip(INVALID_RECORDS, positions, strict=True):
        record = by_offset[position.offset]
        assert record.value == value and record.key == key.encode()
        assert header(record, "x-error-code") == code
        assert header(record, "x-error-message")
        assert header(record, "x-original-topic") == settings.assignments_commands_topic
        assert header(record, "x-original-partition") == str(position.partition)
    stored = await pool.fetch("SELECT command_id, status, error FROM command_outcomes WHERE status = 'invalid'")
    assert len(stored) == len(INVALID_RECORDS)
    ids = {row["command_id"] for row in stored}
    assert {"bad-type", "bad-field"} <= ids
    assert f"{settings.assignments_commands_topic}:{positions[0].partition}:{positions[0].offset}" in ids
    # Metrics: dead letters by reason, commands by type and status, batches, lag per partition, latency.
    expected = {}
    for _, code in INVALID_RECORDS:
        expected[code] = expected.get(code, 0) + 1
    for code, count in expected.items():
        assert sample("segmentation_dlq_records_total", code=code) - dlq_before[code] == count
    assert sample("segmentation_commands_total", type="update_user_segments", status="applied") - applied_before == 1
    assert sample("segmentation_consumer_batch_size_count") > batches_before
    lag = sample("segmentation_consumer_lag", topic=settings.assignments_commands_topic,
                 partition=str(positions[0].partition))
    assert lag == 0 and REGISTRY.get_sample_value(
        "segmentation_consumer_lag", {"topic": settings.assignments_commands_topic,
                                      "partition": str(positions[0].partition)}) is not None
    # Every record, the invalid ones included, timed to durable and to acknowledged (which is later).
    observed = {name: (sample(f"{name}_count") - count, sample(f"{name}_sum") - total)
                for name, (count, total) in latency_before.items()}
    durable, published = observed.values()
    assert durable[0] == published[0] == len(INVALID_RECORDS) + 2
    assert published[1] >= durable[1] > 0


async def test_a_repeated_command_id_changes_nothing_and_repeats_the_outcome(settings, pool):
    command = {"type": "update_user_segments", "user_id": 5, "add": ["A"], "command_id": "dup"}
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])
        await publish.user(command)
        await wait_for_outcomes(pool, ["dup"])
        await publish.user({"type": "update_user_segments", "user_id": 5, "remove": ["A"], "command_id": "rm"})
        await wait_for_outcomes(pool, ["rm"])
        await publish.user(command)  # the same id again, after the removal
        await publish.user({"type": "create_user", "user_id": 5, "command_id": "marker"})
        await wait_for_outcomes(pool, ["marker"])
        results = await read_topic(settings, settings.results_topic, 5)
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id = 5") == 0
    assert await history(pool, 5) == [(5, "A", "I", "manual", "manual"), (5, "A", "D", "manual", "manual")]
    dup = [orjson.loads(r.value) for r in results if r.key == b"dup"]
    tokens = [parse_lsn(outcome.pop("consistency_token")) for outcome in dup]
    assert len(dup) == 2 and dup[0] == dup[1]  # the same outcome...
    assert tokens[1] >= tokens[0]  # ...with a position at or after its commit, read when it was published


async def test_ttl_is_stored_as_expires_at(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await publish.segment({"type": "create_segment", "slug": "B", "command_id": "b"})
        await wait_for_outcomes(pool, ["a", "b"])
        await publish.user({"type": "update_user_segments", "user_id": 9, "add": ["A"], "ttl_seconds": 3600,
                            "command_id": "ttl"})
        await publish.user({"type": "update_user_segments", "user_id": 9, "add": ["B"],
                            "expires_at": "2999-01-02T03:04:05Z", "command_id": "at"})
        outcomes = await wait_for_outcomes(pool, ["ttl", "at"])
    rows = {r["slug"]: r for r in await pool.fetch(
        "SELECT s.slug, m.added_at, m.expires_at FROM memberships m JOIN segments s ON s.id = m.segment_id")}
    ttl = (rows["A"]["expires_at"] - rows["A"]["added_at"]).total_seconds()
    assert 3599 <= ttl <= 3601
    assert rows["B"]["expires_at"].isoformat() == "2999-01-02T03:04:05+00:00"
    assert outcomes["at"]["result"]["expires_at"] == "2999-01-02T03:04:05.000Z"


async def test_add_then_remove_for_one_user_keeps_order_across_batches(settings, pool):
    settings = settings.model_copy(update={"consumer_max_batch": 3})
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])  # no order across topics: the segment must exist first
        ids = [f"op{i}" for i in range(20)]
        for i, command_id in enumerate(ids):  # at most 3 records a poll: the stream spans many batches
            await publish.user({"type": "update_user_segments", "user_id": 4,
                                ("add" if i % 2 == 0 else "remove"): ["A"], "command_id": command_id})
        await wait_for_outcomes(pool, ids)
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id = 4") == 0  # last was a remove
    assert [row[2] for row in await history(pool, 4)] == ["I", "D"] * 10
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE status = 'applied'") == 21


async def test_delete_segment_removes_it_from_every_user_with_history(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])
        for user_id in (1, 2, 3):
            await publish.user({"type": "update_user_segments", "user_id": user_id, "add": ["A"],
                                "command_id": f"add{user_id}"})
        await wait_for_outcomes(pool, ["add1", "add2", "add3"])
        await publish.segment({"type": "delete_segment", "slug": "A", "command_id": "del"})
        outcomes = await wait_for_outcomes(pool, ["del"])
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "again"})
        again = await wait_for_outcomes(pool, ["again"])
    assert outcomes["del"]["result"]["explicit_members_removed"] == 3
    assert again["again"]["status"] == "applied"
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    deleted = [row for row in await history(pool) if row[2] == "D"]
    assert sorted(deleted) == [(u, "A", "D", "manual", "segment_deleted") for u in (1, 2, 3)]


def _partition_of(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner gives a key (murmur2, as Java clients do)."""
    return DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))


async def test_a_partition_stalled_on_a_lock_does_not_hold_back_the_others(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A"], "command_id": "held-add"})
        await wait_for_outcomes(pool, ["a", "held-add"])
        held = _partition_of(b"1", settings.topic_partitions)
        free_user = next(u for u in range(2, 100) if _partition_of(str(u).encode(), settings.topic_partitions) != held)

        async with memberships_locked(settings, 1):  # stalls user 1's partition
            await publish.user({"type": "update_user_segments", "user_id": 1, "remove": ["A"],
                                "command_id": "held-remove"})
            for wave in range(4):  # one batch after the other on the free partition
                await publish.user({"type": "update_user_segments", "user_id": free_user,
                                    ("add" if wave % 2 == 0 else "remove"): ["A"], "command_id": f"free{wave}"})
                await wait_for_outcomes(pool, [f"free{wave}"], timeout=10)
            assert await pool.fetchval(
                "SELECT count(*) FROM command_outcomes WHERE command_id = 'held-remove'") == 0
        outcomes = await wait_for_outcomes(pool, ["held-remove"])  # the lock is gone: the stalled batch applies
    assert outcomes["held-remove"]["result"]["removed"] == ["A"]
    assert [row[2] for row in await history(pool, 1)] == ["I", "D"]
    assert [row[2] for row in await history(pool, free_user)] == ["I", "D", "I", "D"]


async def user_1_in_segment_a(settings, pool, publish: Publisher) -> None:
    """Segment A, and user 1 in it, applied by a consumer stopped again (the next one starts with
    whatever is published meanwhile waiting in the topic)."""
    async with running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A"], "command_id": "held-add"})
        await wait_for_outcomes(pool, ["a", "held-add"])


async def test_partitions_fetched_together_share_a_batch_that_splits_when_it_meets_a_lock(settings, pool):
    """Under light load the partitions of one fetch share a transaction; when that transaction
    waits on a row lock, it gives up after CONSUMER_SHARED_LOCK_TIMEOUT_MS and each partition goes
    on alone, so the lock holds back only its own partition."""
    settings = settings.model_copy(update={"consumer_shared_lock_timeout_ms": 100})
    async with Publisher(settings) as publish:
        await user_1_in_segment_a(settings, pool, publish)
        held = _partition_of(b"1", settings.topic_partitions)
        free_users = {}
        for user in range(2, 200):  # one user on each other partition
            free_users.setdefault(_partition_of(str(user).encode(), settings.topic_partitions), user)
        free_users.pop(held, None)
        assert len(free_users) == settings.topic_partitions - 1
        # All of it waits in the topic, so the consumer's first fetch brings every partition at once.
        await publish.user({"type": "update_user_segments", "user_id": 1, "remove": ["A"], "command_id": "held-remove"})
        for user in free_users.values():
            await publish.user({"type": "update_user_segments", "user_id": user, "add": ["A"],
                                "command_id": f"free-{user}"})
        splits = REGISTRY.get_sample_value("segmentation_consumer_shared_batch_splits_total") or 0.0
        async with contextlib.AsyncExitStack() as lock:
            await lock.enter_async_context(memberships_locked(settings, 1))  # before the consumer starts
            async with running_consumer(settings, pool):
                await wait_for_outcomes(pool, [f"free-{user}" for user in free_users.values()], timeout=20)
                assert await pool.fetchval(
                    "SELECT count(*) FROM command_outcomes WHERE command_id = 'held-remove'") == 0
                assert REGISTRY.get_sample_value("segmentation_consumer_shared_batch_splits_total") == splits + 1
                await lock.aclose()
                outcomes = await wait_for_outcomes(pool, ["held-remove"])  # the lock is gone
    assert outcomes["held-remove"]["result"]["removed"] == ["A"]
    assert [row[2] for row in await history(pool, 1)] == ["I", "D"]


async def test_a_stop_while_a_shared_batch_waits_on_a_lock_finishes_the_batches_it_splits_into(settings, pool):
    """Stopping waits for the batches in hand, including those a shared batch splits into while
    the stop waits: every command fetched is applied and committed, none abandoned."""
    settings = settings.model_copy(update={"consumer_shared_lock_timeout_ms": 1500})
    async with Publisher(settings) as publish:
        await user_1_in_segment_a(settings, pool, publish)
        free = next(user for user in range(2, 200) if _partition_of(str(user).encode(), settings.topic_partitions)
                    != _partition_of(b"1", settings.topic_partitions))
        await publish.user({"type": "update_user_segments", "user_id": 1, "remove": ["A"], "command_id": "held-remove"})
        await publish.user({"type": "update_user_segments", "user_id": free, "add": ["A"], "command_id": "free"})
    async with contextlib.AsyncExitStack() as lock:
        await lock.enter_async_context(memberships_locked(settings, 1))
        consumer = build_consumer(settings, pool)
        running = asyncio.create_task(consumer.run())
        try:
            async with asyncio.timeout(30):  # the shared batch is waiting for the lock
                while not await pool.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            consumer.stop()  # before the lock timeout splits the batch
            await wait_for_outcomes(pool, ["free"], timeout=20)  # split, and the free partition applied
            await lock.aclose()
            await asyncio.wait_for(running, 30)
        finally:
            if not running.done():
                running.cancel()
    assert (await wait_for_outcomes(pool, ["held-remove"], timeout=1))["held-remove"]["status"] == "applied"


async def test_segment_commands_fetched_with_user_commands_apply_first(settings, pool):
    async with Publisher(settings) as publish:  # all of it waits in the topics before the consumer starts
        creates = [{"type": "create_segment", "slug": f"S{i}", "command_id": f"s{i}"} for i in range(150)]
        deliveries = [await publish.producer.send(settings.segments_commands_topic, orjson.dumps(c),
                                                  key=c["slug"].encode()) for c in creates]
        await asyncio.gather(*deliveries)
        await publish.user({"type": "update_user_segments", "user_id": 7, "add": ["S149", "S0"], "command_id": "u"})
    async with running_consumer(settings, pool):
        outcomes = await wait_for_outcomes(pool, ["u", *(c["command_id"] for c in creates)])
    assert outcomes["u"]["status"] == "applied", outcomes["u"]
    assert await history(pool, 7) == [(7, "S149", "I", "manual", "manual"), (7, "S0", "I", "manual", "manual")]


async def test_stopping_finishes_the_batch_in_hand_and_commits_it(settings, pool):
    async with Publisher(settings) as publish:
        consumer = build_consumer(settings, pool)
        running = asyncio.create_task(consumer.run())
        try:
            await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
            await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A"], "command_id": "add"})
            await wait_for_outcomes(pool, ["a", "add"])
            async with memberships_locked(settings, 1):
                await publish.user({"type": "update_user_segments", "user_id": 1, "remove": ["A"],
                                    "command_id": "in-hand"})
                await wait_for_count(pool, "SELECT count(*) FROM pg_locks WHERE NOT granted", 1)
                consumer.stop()  # the batch is in hand, waiting for the lock
                await asyncio.sleep(0.5)
                assert not running.done()
            await asyncio.wait_for(running, 30)  # a clean return, once the batch is done
        finally:
            consumer.stop()
            await asyncio.gather(running, return_exceptions=True)
        stored = await pool.fetchrow("SELECT status, result FROM command_outcomes WHERE command_id = 'in-hand'")
        assert stored["status"] == "applied" and stored["result"]["removed"] == ["A"]

        async with running_consumer(settings, pool):  # the same group: starts after the committed offset
            await publish.user({"type": "create_user", "user_id": 2, "command_id": "after"})
            await wait_for_outcomes(pool, ["after"])
    results = await read_topic(settings, settings.results_topic, 4)
    assert sorted(record.key.decode() for record in results) == ["a", "add", "after", "in-hand"]  # none again


async def test_outcomes_land_on_their_keys_partition_in_batches_larger_than_one_record_batch(settings, pool):
    """Outcomes are built into record batches here (publishing.py): each lands on the partition the
    producer's default partitioner gives its key (murmur2 of the command id, as Java clients
    place it), in the order its commands were applied, also when a batch's outcomes fill several
    record batches of a partition and one outcome is larger than a record batch on its own."""
    # 1,000 segments added and 1,000 left unchanged, each slug 128 characters, are listed in the
    # outcome's result: an outcome larger than a record batch (256 KiB).
    huge = {field: [f"{field}_{n:03d}_".ljust(128, "X") for n in range(1000)] for field in ("add", "remove")}
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) SELECT unnest($1::text[]), now(), now()",
                       huge["add"] + huge["remove"])
    commands = [{"type": "create_user", "user_id": n, "command_id": f"c-{n:05d}"} for n in range(1, 3001)]
    async with Publisher(settings) as publish:
        await publish.users(commands)  # preloaded: the consumer takes them in large batches
        await publish.user({"type": "update_user_segments", "user_id": 1, **huge, "command_id": "huge"})
    async with running_consumer(settings, pool):
        await wait_for_outcomes(pool, [c["command_id"] for c in commands] + ["huge"], timeout=60)
    results = await read_topic(settings, settings.results_topic, len(commands) + 1, timeout=60)
    assert len(results) == len(commands) + 1
    for record in results:
        assert record.partition == _partition_of(record.key, settings.topic_partitions), record.key
    largest = next(r for r in results if r.key == b"huge")
    assert len(largest.value) > 262_144
    body = orjson.loads(largest.value)
    assert body["status"] == "applied" and len(body["result"]["added"]) == 1000
    # Per source partition, outcomes come out in the order the commands were applied.
    applied_order = {c["command_id"]: i for i, c in enumerate(commands)}
    for partition in range(settings.topic_partitions):
        on_partition = [r.key.decode() for r in sorted(results, key=lambda r: r.offset)
                        if r.partition == partition and r.key != b"huge"]
        by_user_partition: dict[int, list[int]] = {}
        for command_id in on_partition:
            user_id = int(command_id[2:])
            source = _partition_of(str(user_id).encode(), settings.topic_partitions)
            by_user_partition.setdefault(source, []).append(applied_order[command_id])
        for order in by_user_partition.values():
            assert order == sorted(order)


def _holding_acknowledgements(consumer: CommandConsumer, until: asyncio.Event, refuse_first: bool = False) -> None:
    """The consumer's outcome batches wait for `until` before they count as acknowledged; with
    `refuse_first`, the first one is never sent and then fails, as a produce that timed out."""
    send_batch = consumer.producer.send_batch
    calls = 0

    async def held(*args, **kwargs):
        nonlocal calls
        calls += 1
        delivery = None if refuse_first and calls == 1 else await send_batch(*args, **kwargs)

        async def acknowledged():
            await until.wait()
            if delivery is None:
                raise KafkaTimeoutError("the outcome batch was not acknowledged")
            return await delivery

        return asyncio.ensure_future(acknowledged())

    consumer.producer.send_batch = held


async def test_a_partition_applies_its_next_batch_while_the_outcomes_before_await_acknowledgement(settings, pool):
    """A batch's partition is free once its transaction commits: its next batch is applied while
    the outcomes before are still on their way to Kafka, one publish outstanding per partition and
    no more, and no offset is committed before the outcomes it covers are acknowledged."""
    released = asyncio.Event()
    tp = TopicPartition(settings.assignments_commands_topic, _partition_of(b"1", settings.topic_partitions))
    async with Publisher(settings) as publish:
        consumer = build_consumer(settings, pool)
        _holding_acknowledgements(consumer, released)
        running = asyncio.create_task(consumer.run())
        try:
            for n in (1, 2):  # one batch each: the second is published once the first is applied
                await publish.user({"type": "create_user", "user_id": 1, "command_id": f"c{n}"})
                await wait_for_outcomes(pool, [f"c{n}"], timeout=20)
            await publish.user({"type": "create_user", "user_id": 1, "command_id": "c3"})
            await asyncio.sleep(1)  # c2's batch waits for c1's outcomes: the partition is still in hand
            assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = 'c3'") == 0
            assert await consumer.kafka_consumer.committed(tp) is None
            released.set()
            await wait_for_outcomes(pool, ["c3"], timeout=20)
            async with asyncio.timeout(20):
                while await consumer.kafka_consumer.committed(tp) != 3:  # noqa: ASYNC110 - the committer's pace
                    await asyncio.sleep(0.05)
        finally:
            consumer.stop()
            await asyncio.wait_for(running, 30)
    results = await read_topic(settings, settings.results_topic, 3)
    assert sorted(record.key.decode() for record in results) == ["c1", "c2", "c3"]


async def test_an_unacknowledged_publish_stops_the_consumer_and_no_later_batch_commits_past_it(settings, pool):
    """The batch applied after one whose outcomes were not acknowledged must not commit its
    offsets (they would cover the lost outcomes): the consumer stops with the error, and the next
    one redelivers both commands and publishes both outcomes from the inbox."""
    released = asyncio.Event()
    async with Publisher(settings) as publish:
        consumer = build_consumer(settings, pool)
        _holding_acknowledgements(consumer, released, refuse_first=True)
        running = asyncio.create_task(consumer.run())
        try:
            for n in (1, 2):
                await publish.user({"type": "create_user", "user_id": 1, "command_id": f"c{n}"})
                await wait_for_outcomes(pool, [f"c{n}"], timeout=20)
            released.set()
            with pytest.raises(KafkaTimeoutError):
                await asyncio.wait_for(running, 30)
        finally:
            consumer.stop()
            await asyncio.gather(running, return_exceptions=True)
        async with running_consumer(settings, pool):
            results = await read_topic(settings, settings.results_topic, 2)
    assert sorted(record.key.decode() for record in results) == ["c1", "c2"]
    assert {header(record, "status") for record in results} == {"applied"}
    created = {record.key.decode(): orjson.loads(record.value)["result"]["created"] for record in results}
    assert created == {"c1": True, "c2": False}  # the stored outcomes: neither command applied twice


async def test_batches_hand_their_outcomes_to_the_producer_one_at_a_time_and_closed(settings, pool):
    """Many batches publishing at once (a batch per partition, preloaded) hand their outcome
    batches to the producer one publish at a time: callers queued on aiokafka's one-batch-per-
    partition slot each lose their whole wait from their timeout at every turn, and under load ran
    out (KafkaTimeoutError) while every turn was short. Each record batch is handed over closed,
    so it is sent at once rather than after the producer's linger. Every outcome still arrives."""
    settings = settings.model_copy(update={"consumer_combine_records": 0, "consumer_max_batch": 50})
    commands = [{"type": "create_user", "user_id": n, "command_id": f"u{n}"} for n in range(1, 2001)]
    async with Publisher(settings) as publish:
        await publish.users(commands)
    consumer = build_consumer(settings, pool)
    send_batch = consumer.producer.send_batch
    handing, most = 0, 0
    closed: list[bool] = []

    async def counted(builder, *args, **kwargs):
        nonlocal handing, most
        closed.append(builder.closed())
        handing += 1
        most = max(most, handing)
        try:
            return await send_batch(builder, *args, **kwargs)
        finally:
            handing -= 1

    consumer.producer.send_batch = counted
    running = asyncio.create_task(consumer.run())
    try:
        await wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=60)
    finally:
        consumer.stop()
        await asyncio.wait_for(running, 30)
    assert most == 1
    assert closed and all(closed)
    results = await read_topic(settings, settings.results_topic, len(commands), timeout=60)
    assert sorted(record.key.decode() for record in results) == sorted(c["command_id"] for c in commands)


async def test_user_commands_wait_only_for_segment_commands_naming_their_segments(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "BIG", "command_id": "big"})
        await publish.segment({"type": "create_segment", "slug": "OTHER", "command_id": "other"})
        await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["BIG"], "command_id": "in-big"})
        await wait_for_outcomes(pool, ["big", "other", "in-big"])
        async with segment_locked(settings, "BIG"):  # the deletion stays in hand, as a long one would
            await publish.segment({"type": "delete_segment", "slug": "BIG", "command_id": "delete-big"})
            await asyncio.sleep(0.5)  # fetched and started: its batch waits on the row lock
            await publish.user({"type": "update_user_segments", "user_id": 2, "add": ["BIG"], "command_id": "late"})
            waiting = _partition_of(b"2", settings.topic_partitions)  # keeps its order: behind "late"
            unrelated = [{"type": "update_user_segments", "user_id": user, "add": ["OTHER"], "command_id": f"o{user}"}
                         for user in range(3, 40) if _partition_of(str(user).encode(), settings.topic_partitions)
                         != waiting]
            for command in unrelated:
                await publish.user(command)
            await publish.user({"type": "create_user", "user_id": 99, "command_id": "new-user"})
            outcomes = await wait_for_outcomes(pool, [c["command_id"] for c in unrelated] + ["new-user"], timeout=15)
            assert all(outcome["status"] == "applied" for outcome in outcomes.values())
            # A command naming the segment being deleted waits for the deletion, as fetched together.
            assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = ANY($1::text[])",
                                       ["delete-big", "late"]) == 0
        outcomes = await wait_for_outcomes(pool, ["delete-big", "late"])
    assert outcomes["delete-big"]["result"]["explicit_members_removed"] == 1
    assert outcomes["late"]["error"]["code"] == "segment_not_found"  # applied after the deletion, in order
