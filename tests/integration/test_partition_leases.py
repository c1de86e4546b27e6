"""Partition leases (CONSUMER_PARTITION_OWNERSHIP=lease): one process owns the command partitions by
holding an advisory lock per partition; another waits as a standby and takes them the moment the
holder's database session ends, whether it was SIGKILLed or its session was cut. State, history
and outcomes equal the contract model's afterwards: nothing skipped, nothing applied twice.
bench/consumer_recovery.py measures how soon a restarted process applies again."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from services.command_consumer.leases import KEEPALIVES
from tests.contract_model import SEGMENTS, scenario
from tests.support import Publisher, create_segments, running_consumer, service_env, wait_for_outcomes

pytestmark = pytest.mark.integration

LEASE_SESSION = KEEPALIVES["application_name"]


def leasing(settings):
    return settings.model_copy(update={"consumer_partition_ownership": "lease", "consumer_lease_check_seconds": 0.1})


async def lease_holders(pool) -> dict[int, int]:
    """Advisory locks granted in this test's database, by the backend holding them."""
    rows = await pool.fetch(
        """SELECT pid, count(*) AS locks FROM pg_locks
           WHERE locktype = 'advisory' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           GROUP BY pid""")
    return {row["pid"]: row["locks"] for row in rows}


async def until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 - polling the server and another process
            await asyncio.sleep(0.05)


def start_consumer_process(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def partitions(settings) -> int:
    return len(settings.command_topics) * settings.topic_partitions


async def test_a_standby_takes_the_partitions_of_a_sigkilled_holder(settings, pool):
    settings = leasing(settings)
    model, segments, commands = scenario(2000, users=200, seed=23)
    env = service_env(settings, CONSUMER_MAX_BATCH="100", CONSUMER_METRICS_PORT="0")
    holder = start_consumer_process(env)
    try:
        async def holder_has_all() -> bool:
            return list((await lease_holders(pool)).values()) == [partitions(settings)]

        await until(holder_has_all)
        async with Publisher(settings) as publish, running_consumer(settings, pool) as standby:
            async def standby_has_tried() -> bool:
                return standby.leases.checks >= 3

            await until(standby_has_tried)
            assert standby.leases.held == frozenset()  # every lock was taken: it waits
            assert await holder_has_all()

            await create_segments(publish, pool, segments)  # applied by the holder
            await publish.users(commands[:1000])
            await wait_for_outcomes(pool, [c["command_id"] for c in commands[:200]], timeout=60)
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            await publish.users(commands[1000:])
            await wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=120)

            assert len(standby.leases.held) == partitions(settings)
            [(pid, locks)] = (await lease_holders(pool)).items()
            assert locks == partitions(settings)
            assert pid == await pool.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
                LEASE_SESSION)
    finally:
        holder.kill()
        holder.wait()
    await model.assert_matches(pool)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(commands) + len(SEGMENTS)


async def test_a_holder_whose_session_is_cut_drops_its_leases_and_takes_them_again(settings, pool):
    settings = leasing(settings)
    model, segments, commands = scenario(2000, users=200, seed=29)
    async with Publisher(settings) as publish, running_consumer(settings, pool) as consumer:
        async def holds_all() -> bool:
            return len(consumer.leases.held) == partitions(settings)

        await until(holds_all)
        [first_session] = await lease_holders(pool)
        await create_segments(publish, pool, segments)
        sending = asyncio.create_task(publish.users(commands))
        await wait_for_outcomes(pool, [c["command_id"] for c in commands[:100]], timeout=60)
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", first_session)
        await sending
        await wait_for_outcomes(pool, [c["command_id"] for c in commands], timeout=120)

        async def held_again() -> bool:
            return list((await lease_holders(pool)).values()) == [partitions(settings)]

        await until(held_again)
        [second_session] = await lease_holders(pool)
        assert second_session != first_session
        assert await holds_all()
    await model.assert_matches(pool)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(commands) + len(SEGMENTS)


async def test_a_graceful_stop_hands_the_leases_over(settings, pool):
    """A stopping holder finishes and commits its batches, then closes the session: the next
    process starts where it stopped."""
    settings = leasing(settings)
    model, segments, commands = scenario(600, users=100, seed=31)
    async with Publisher(settings) as publish:
        async with running_consumer(settings, pool) as first:
            await create_segments(publish, pool, segments)
            await publish.users(commands[:300])
            await wait_for_outcomes(pool, [c["command_id"] for c in commands[:300]])
            assert len(first.leases.held) == partitions(settings)

        async def released() -> bool:  # the server ends the closed session, and its locks, on its own time
            return await lease_holders(pool) == {}

        await until(released)
        await publish.users(commands[300:])
        async with running_consumer(settings, pool) as second:
            await wait_for_outcomes(pool, [c["command_id"] for c in commands])
            assert len(second.leases.held) == partitions(settings)
    await model.assert_matches(pool)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(commands) + len(SEGMENTS)
