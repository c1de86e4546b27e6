"""The consumer's guarantees under faults: a killed process, a restarted database, a bad deploy."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from services.command_consumer.bootstrap import build_consumer
from services.command_consumer.poison_guard import PoisonGuardTripped
from tests import support
from tests.contract_model import SEGMENTS, scenario

pytestmark = pytest.mark.integration


async def test_sigkill_mid_stream_then_restart_matches_the_model(settings, pool):
    model, segments, commands = scenario(4000, users=300, seed=7)
    env = support.service_env(settings, CONSUMER_MAX_BATCH="200", CONSUMER_METRICS_PORT="0")

    def start():
        return subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    kills = 0
    consumer = start()
    try:
        async with support.Publisher(settings) as publish:
            await support.create_segments(publish, pool, segments)
            for start_at in range(0, len(commands), 500):
                await publish.users(commands[start_at:start_at + 500])
                applied = await pool.fetchval("SELECT count(*) FROM command_outcomes")
                if applied > len(SEGMENTS) and kills < 3:
                    consumer.send_signal(signal.SIGKILL)
                    consumer.wait()
                    kills += 1
                    consumer = start()
                await asyncio.sleep(0.3)
        await support.wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=120)
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(30) == 0
    assert kills == 3
    counts = await model.assert_matches(pool)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(commands) + len(SEGMENTS)
    print(f"{len(commands)} commands, {kills} kills: state, history and outcomes equal the model: {counts}")


async def test_database_restarted_mid_stream(infra, settings, pool):
    if infra.postgres is None:
        pytest.skip("needs the embedded PostgreSQL the test session owns")
    model, segments, commands = scenario(3000, users=200, seed=11)
    settings = settings.model_copy(update={"consumer_max_batch": 100})
    async with support.Publisher(settings) as publish, support.running_consumer(settings, pool):
        await support.create_segments(publish, pool, segments)
        sent = asyncio.create_task(publish.users(commands))
        await support.wait_for_count(pool, "SELECT count(*) FROM command_outcomes", 500)
        await asyncio.to_thread(infra.postgres.stop, "immediate")  # a crash, not a clean shutdown
        await asyncio.sleep(1.5)  # the consumer meets a dead database and backs off
        await asyncio.to_thread(infra.postgres.start)
        await sent
        await support.wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=120)
    await model.assert_matches(pool)


async def test_guard_stops_the_consumer_on_a_flood_of_invalid_records(settings, pool):
    settings = settings.model_copy(update={"poison_guard_window": 50, "poison_guard_max_invalid_share": 0.9})
    async with support.Publisher(settings) as publish:
        for i in range(200):
            await publish.raw(settings.assignments_commands_topic, b"garbage %d" % i, key=str(i % 7))
        with pytest.raises(PoisonGuardTripped, match="invalid"):
            await asyncio.wait_for(build_consumer(settings, pool).run(), 60)
    dead_lettered = await support.read_topic(settings, settings.dlq_topic, 200, timeout=3)
    assert len(dead_lettered) < 200  # it stopped instead of dead-lettering the whole flood


async def test_a_consumer_joining_and_leaving_mid_stream_loses_and_repeats_nothing(settings, pool):
    model, segments, commands = scenario(4000, users=300, seed=13)
    settings = settings.model_copy(update={"consumer_max_batch": 100})
    async with support.Publisher(settings) as publish, support.running_consumer(settings, pool) as first:
        await support.create_segments(publish, pool, segments)
        await publish.users(commands[:1500])
        async with support.running_consumer(settings, pool) as second:  # joins: partitions are revoked and moved
            sending = asyncio.create_task(publish.users(commands[1500:3000]))
            async with asyncio.timeout(60):
                while not second.kafka_consumer.assignment():  # noqa: ASYNC110 - set by the client, no event
                    await asyncio.sleep(0.05)
            moved = len(second.kafka_consumer.assignment())
            await sending
            await support.wait_for_count(pool, "SELECT count(*) FROM command_outcomes", 3000)
        # ...and leaves: its partitions go back to the first consumer
        await publish.users(commands[3000:])
        await support.wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=120)
        assert len(first.kafka_consumer.assignment()) == 2 * settings.topic_partitions
    assert moved > 0
    await model.assert_matches(pool)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(commands) + len(SEGMENTS)
