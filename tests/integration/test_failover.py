"""Losing the PostgreSQL primary under load, on a real high-availability engine (pg_auto_failover,
devstack/failover.py): commands at about 300 a second and reads at about 1,000 a second while the
primary is SIGKILLed, the standby promoted, the old primary brought back as the new standby, and
then the new primary killed too. The services are not restarted. Afterwards every command is
in the database exactly once, reads agree, and no read was answered 500: only 503 with
Retry-After, while no primary could answer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import functools
import io
import itertools
import random
import subprocess
import sys
import time
from datetime import UTC, datetime

import aiohttp
import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bench.failover import Load, aiohttp_get, applied_since, promoted_elsewhere, seconds_until
from devstack.failover import AutoFailoverCluster, missing
from devstack.processes import free_port, stop_process
from services.command_consumer import durability
from shared.db import apply_migrations, create_pool
from tests.support import Publisher, service_env, wait_for_outcomes

pytestmark = [pytest.mark.integration, pytest.mark.skipif(missing() is not None, reason=missing() or "")]

COMMANDS_PER_SECOND = 300
READS_PER_SECOND = 1000


@pytest.fixture
def cluster():
    cluster = AutoFailoverCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def start_service(service: str, settings, log_dir, **env: str) -> subprocess.Popen:
    """A service as its own process, retrying its work for as long as a failover takes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{service}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", f"services.{service}"], stdout=log, stderr=subprocess.STDOUT,
                                env=service_env(settings, DB_RETRY_ATTEMPTS="100000",
                                                DB_RETRY_MAX_BACKOFF_SECONDS="0.5", **env))


def start_consumer(settings, log_dir, **env: str) -> subprocess.Popen:
    return start_service("command_consumer", settings, log_dir, **env)


async def reads_by_server(http: httpx.AsyncClient) -> dict[str, float]:
    """segmentation_reads_by_server_total from the API's /metrics: reads answered by each server."""
    text = (await http.get("/metrics")).text
    return {sample.labels["server"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "segmentation_reads_by_server" for sample in family.samples
            if sample.name.endswith("_total")}


async def wait_until_serving(http: httpx.AsyncClient, api: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert api.poll() is None, "the query API exited"
        with contextlib.suppress(httpx.TransportError):
            if (await http.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("the query API did not become ready")


async def test_losing_the_primary_twice_under_load_loses_and_repeats_nothing(settings, cluster, tmp_path):
    """Reads go, half each, to two query API processes: one reading the primary only, one whose
    replicas (READ_DATABASE_URLS) are the formation's nodes, standby preferred. Through both
    switches the second keeps being answered by its replicas, including the standby that was
    promoted and so no longer replays anything."""
    await asyncio.to_thread(apply_migrations, cluster.url)
    ha = settings.model_copy(update={"database_url": cluster.url})
    ports = {"primary only": free_port(), "replicas": free_port()}
    consumer = start_consumer(ha, tmp_path)
    apis = [start_service("query_api", ha, tmp_path / name, API_PORT=str(port), API_WORKERS="1",
                          READ_DATABASE_URLS=cluster.url.replace("read-write", "prefer-standby")
                          if name == "replicas" else "") for name, port in ports.items()]
    pool = await create_pool(cluster.url, min_size=1, max_size=2)
    switches, replica_reads = [], []
    by_api: dict[str, collections.Counter[int]] = {name: collections.Counter() for name in ports}
    try:
        async with contextlib.AsyncExitStack() as stack:
            publish = await stack.enter_async_context(Publisher(ha))
            http = {name: await stack.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}"))
                    for name, port in ports.items()}
            sessions = [await stack.enter_async_context(aiohttp.ClientSession(
                f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=30))) for port in ports.values()]
            for client, api in zip(http.values(), apis, strict=True):
                await wait_until_serving(client, api)
            await publish.segment({"type": "create_segment", "slug": "HA", "command_id": "ha"})
            await wait_for_outcomes(pool, ["ha"], timeout=60)
            load = Load(publish.producer, ha.assignments_commands_topic, alternating(sessions, by_api),
                        COMMANDS_PER_SECOND, READS_PER_SECOND)
            async with load.running():
                for _ in range(2):  # the primary, then the new primary once it has its standby back
                    await asyncio.sleep(4)
                    old = await asyncio.to_thread(cluster.wait_for_standby)
                    replica_reads.append(await reads_by_server(http["replicas"]))
                    load.killed_at, load.first_read_after = time.monotonic(), None
                    sent_before = len(load.sent)
                    await asyncio.to_thread(cluster.kill, old)
                    promoted = await seconds_until(functools.partial(promoted_elsewhere, cluster, old), 90)
                    applied = await seconds_until(functools.partial(applied_since, cluster.url, sent_before + 1), 90)
                    switches.append((old, promoted, promoted + applied, load.first_read_after))
                    await asyncio.sleep(3)
                    await asyncio.to_thread(cluster.restart, old)  # back, as the new standby
                await asyncio.sleep(3)
            replica_reads.append(await reads_by_server(http["replicas"]))
            await pool.close()
            pool = await create_pool(cluster.url, min_size=1, max_size=2)
            outcomes = await wait_for_outcomes(pool, load.sent, timeout=120)
            for client in http.values():  # reads and the month's report agree with the commands sent
                for user_id in random.Random(1).sample(range(1, len(load.sent) + 1), 100):
                    assert (await client.get(f"/users/{user_id}/segments")).json()["segments"][0]["slug"] == "HA"
                assert await entered_ha(client) == [int(c[1:]) for c in load.sent]
    finally:
        stop_process(consumer)
        for api in apis:
            stop_process(api)
        await pool.close()

    assert all(outcome["status"] == "applied" for outcome in outcomes.values())
    assert await entries_lost_or_doubled(cluster.url, load.sent) == ([], [])  # each command's entry, once
    assert load.statuses.get(500, 0) == 0 and set(load.statuses) <= {200, 503}, by_api
    assert load.missing_retry_after == 0
    replica = next(server for server in replica_reads[-1] if server != "primary")
    answered = [phase.get(replica, 0) for phase in replica_reads]
    assert 0 < answered[0] < answered[1] < answered[2], f"reads answered by the replica pool, cumulative: {answered}"
    print(f"\nfailover: {len(load.sent)} commands, {sum(load.statuses.values())} reads at "
          f"{load.reads_per_second:.0f}/s {dict(by_api)}, by server {replica_reads[-1]}; "
          + "; ".join(f"{old} killed: promoted after {promoted:.1f}s, first command applied {applied:.1f}s, "
                      f"first read {read or 0:.1f}s" for old, promoted, applied, read in switches))


async def entered_ha(http: httpx.AsyncClient) -> list[int]:
    """The users the month's all-users report shows entering HA, in user order, one row each."""
    now = datetime.now(UTC)
    link = (await http.get("/reports/history", params={"year": now.year, "month": now.month})).json()["report_link"]
    rows = csv.DictReader(io.StringIO((await http.get(link)).text))
    return sorted(int(row["user_id"]) for row in rows if row["segment_slug"] == "HA" and row["operation"] == "I")


def alternating(sessions: list[aiohttp.ClientSession], by_api: dict[str, collections.Counter[int]]):
    """Reads sent to each API in turn, their statuses counted per API."""
    gets = [(name, aiohttp_get(session)) for name, session in zip(by_api, sessions, strict=True)]
    turn = itertools.cycle(gets)

    async def get(path: str):
        name, send = next(turn)
        status, headers = await send(path)
        by_api[name][status] += 1
        return status, headers
    return get


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


async def test_the_consumer_sees_when_commits_are_acknowledged_by_the_primary_alone(cluster):
    """With its standby, the primary waits for it before acknowledging a commit; with the standby
    gone, pg_auto_failover lets the primary acknowledge alone (wait_primary): the gauge says so and,
    since synchronous commits were expected, the consumer warns; with the standby back, both undo."""
    primary = await asyncio.to_thread(cluster.wait_for_standby)
    standby = "node2" if primary == "node1" else "node1"
    pool = await create_pool(cluster.url, min_size=1, max_size=1)
    watching = asyncio.create_task(durability.watch(pool, expected=True, every=0.1))
    try:
        with capture_logs() as logs:
            assert await gauge_becomes(1)
            await asyncio.to_thread(cluster.kill, standby)
            assert await gauge_becomes(0)
            await asyncio.to_thread(cluster.restart, standby)
            await asyncio.to_thread(cluster.wait_for_standby)
            assert await gauge_becomes(1)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await pool.close()
    warnings = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1 and "primary alone" in warnings[0], logs
    assert REGISTRY.get_sample_value("segmentation_db_synchronous_commit_expected") == 1


async def gauge_becomes(value: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while REGISTRY.get_sample_value("segmentation_db_commits_synchronous") != value:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True
