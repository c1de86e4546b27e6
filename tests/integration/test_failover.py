"""Losing the PostgreSQL primary under load, on a real high-availability engine (pg_auto_failover,
devstack/failover.py): commands at about 300 a second and reads at up to 1,000 a second while the
primary is SIGKILLed, the standby promoted, the old primary brought back as the new standby, and
then the new primary killed too. The services are not restarted. Afterwards every command is
in the database exactly once, reads agree, and no read was answered 500: only 503 with
Retry-After, while no primary could answer."""

from __future__ import annotations

import asyncio
import functools
import random
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from bench.failover import Load, applied_since, promoted_elsewhere, seconds_until
from devstack.failover import AutoFailoverCluster, missing
from devstack.processes import stop_process
from services.query_api.app import create_app
from shared.db import apply_migrations, create_pool
from tests.support import Publisher, service_env, wait_for_outcomes

pytestmark = [pytest.mark.integration, pytest.mark.skipif(missing() is not None, reason=missing() or "")]

COMMANDS_PER_SECOND = 300


@pytest.fixture
def cluster():
    cluster = AutoFailoverCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def start_consumer(settings, log_dir) -> subprocess.Popen:
    """The command consumer as its own process, retrying its batches for as long as a failover takes."""
    with open(log_dir / "consumer.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "services.command_consumer"], stdout=log,
                                stderr=subprocess.STDOUT, env=service_env(
                                    settings, DB_RETRY_ATTEMPTS="100000", DB_RETRY_MAX_BACKOFF_SECONDS="0.5"))


async def test_losing_the_primary_twice_under_load_loses_and_repeats_nothing(settings, cluster, tmp_path):
    await asyncio.to_thread(apply_migrations, cluster.url)
    ha = settings.model_copy(update={"database_url": cluster.url})
    consumer = start_consumer(ha, tmp_path)
    pool = await create_pool(cluster.url, min_size=1, max_size=2)
    app = create_app(ha)
    switches = []
    try:
        async with Publisher(ha) as publish, app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api.test") as http:
            await publish.segment({"type": "create_segment", "slug": "HA", "command_id": "ha"})
            await wait_for_outcomes(pool, ["ha"], timeout=60)
            load = Load(publish.producer, ha.assignments_commands_topic, http, COMMANDS_PER_SECOND)
            async with load.running():
                for _ in range(2):  # the primary, then the new primary once it has its standby back
                    await asyncio.sleep(4)
                    old = await asyncio.to_thread(cluster.wait_for_standby)
                    load.killed_at, load.first_read_after = time.monotonic(), None
                    sent_before = len(load.sent)
                    await asyncio.to_thread(cluster.kill, old)
                    promoted = await seconds_until(functools.partial(promoted_elsewhere, cluster, old), 90)
                    applied = await seconds_until(functools.partial(applied_since, cluster.url, sent_before + 1), 90)
                    switches.append((old, promoted, promoted + applied, load.first_read_after))
                    await asyncio.sleep(3)
                    await asyncio.to_thread(cluster.restart, old)  # back, as the new standby
                await asyncio.sleep(3)
            await pool.close()
            pool = await create_pool(cluster.url, min_size=1, max_size=2)
            outcomes = await wait_for_outcomes(pool, load.sent, timeout=120)
            for user_id in random.Random(1).sample(range(1, len(load.sent) + 1), 100):
                assert (await http.get(f"/users/{user_id}/segments")).json()["segments"][0]["slug"] == "HA"
    finally:
        stop_process(consumer)
        await pool.close()

    assert all(outcome["status"] == "applied" for outcome in outcomes.values())
    assert await entries_lost_or_doubled(cluster.url, load.sent) == ([], [])  # each command's entry, once
    assert load.statuses.get(500, 0) == 0 and set(load.statuses) <= {200, 503}, load.statuses
    assert load.missing_retry_after == 0
    print(f"\nfailover: {len(load.sent)} commands, {sum(load.statuses.values())} reads {load.statuses}; "
          + "; ".join(f"{old} killed: promoted after {promoted:.1f}s, first command applied {applied:.1f}s, "
                      f"first read {read or 0:.1f}s" for old, promoted, applied, read in switches))


async def entries_lost_or_doubled(url: str, sent: list[str]) -> tuple[list[str], list[str]]:
    """The commands (`c<user id>`, each adding its user to HA) whose entry is not in the history of
    the primary now, and those whose entry is there more than once."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT user_id, count(*) AS n FROM membership_history WHERE segment_slug = 'HA' "
                                "GROUP BY user_id")
    finally:
        await conn.close()
    entries = {f"c{row['user_id']}": row["n"] for row in rows}
    return [c for c in sent if c not in entries], [c for c in sent if entries.get(c, 0) > 1]


async def test_the_check_catches_a_loss_when_commits_are_acknowledged_by_the_primary_alone(
        settings, cluster, tmp_path):
    """The negative control: replication made asynchronous and the standby held back, the same
    kill loses commands the consumer had applied and committed the offsets of; the check above
    must see them gone, or it could not fail."""
    await asyncio.to_thread(apply_migrations, cluster.url)
    ha = settings.model_copy(update={"database_url": cluster.url})
    primary = await asyncio.to_thread(cluster.wait_for_standby)
    standby = "node2" if primary == "node1" else "node1"
    await asyncio.to_thread(cluster.make_asynchronous, primary)
    consumer = start_consumer(ha, tmp_path)
    pool = await create_pool(cluster.url, min_size=1, max_size=2)
    try:
        async with Publisher(ha) as publish:
            await publish.segment({"type": "create_segment", "slug": "HA", "command_id": "ha"})
            await wait_for_outcomes(pool, ["ha"], timeout=60)
            commands = [{"type": "update_user_segments", "user_id": user, "add": ["HA"], "command_id": f"c{user}"}
                        for user in range(1, 601)]
            await publish.users(commands[:300])
            await wait_for_outcomes(pool, [c["command_id"] for c in commands[:300]])
            await asyncio.sleep(1)  # the standby has these
            await asyncio.to_thread(cluster.hold_back, standby)
            await publish.users(commands[300:])
            await wait_for_outcomes(pool, [c["command_id"] for c in commands[300:]])  # applied, acknowledged
            await asyncio.sleep(1)  # and their offsets committed
            await asyncio.to_thread(cluster.kill, primary)
            await seconds_until(functools.partial(promoted_elsewhere, cluster, primary), 90)
        await pool.close()
        pool = await create_pool(cluster.url, min_size=1, max_size=2)
        await asyncio.sleep(3)  # the consumer has had time to apply anything it still would
        lost, doubled = await entries_lost_or_doubled(cluster.url, [c["command_id"] for c in commands])
    finally:
        stop_process(consumer)
        await pool.close()
    print(f"\nnegative control: {len(lost)} of 600 applied commands lost at the promotion, e.g. {lost[:3]}")
    assert lost and set(lost) <= {c["command_id"] for c in commands[300:]} and not doubled
