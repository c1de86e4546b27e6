"""Reads from a real streaming replica (pg_basebackup -R from the session's embedded server):
routing, bounded staleness, consistency tokens, a replica stopped under load, expiry and deletion
as the replica sees them, and 503 (never 500) when no server can answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from devstack.embedded import EmbeddedPostgres, url_on_port, wait_until_replayed
from services.query_api.app import create_app
from tests.proxies import TcpProxy
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(os.environ.get("DATABASE_URL") or os.environ.get("TEST_INFRA")),
                                 reason="streams a replica from the embedded PostgreSQL the session owns")]


@pytest.fixture(scope="module")
def replica(infra, tmp_path_factory):
    server = EmbeddedPostgres(tmp_path_factory.mktemp("replica") / "postgres", replica_of=infra.postgres)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@contextlib.asynccontextmanager
async def api(settings, **changes):
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            client.reads = app.state.resources.reads
            yield client


@contextlib.asynccontextmanager
async def replay_paused(replica_url: str):
    conn = await asyncpg.connect(replica_url)
    try:
        await conn.execute("SELECT pg_wal_replay_pause()")
        yield
    finally:
        await conn.execute("SELECT pg_wal_replay_resume()")
        await conn.close()


async def caught_up(settings, replica_url: str) -> None:
    await wait_until_replayed(settings.database_url, replica_url, timeout=30)


async def slugs(client, user_id: int, **headers) -> list[str]:
    response = await client.get(f"/users/{user_id}/segments", headers=headers)
    assert response.status_code == 200, response.text
    return [segment["slug"] for segment in response.json()["segments"]]


async def add(publish, pool, user_id: int, slug: str, command_id: str, **extra) -> dict:
    await publish.user({"type": "update_user_segments", "user_id": user_id, "add": [slug],
                        "command_id": command_id, **extra})
    return (await wait_for_outcomes(pool, [command_id]))[command_id]


async def test_reads_go_to_the_replica_and_a_token_is_answered_only_where_it_was_replayed(settings, pool, replica):
    replica_url = url_on_port(settings.database_url, replica.port)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "R", "command_id": "s"})
        await wait_for_outcomes(pool, ["s"])
        await add(publish, pool, 1, "R", "first")
        await caught_up(settings, replica_url)
        async with api(settings, read_database_urls=[replica_url], max_replica_lag_ms=60_000,
                       read_token_wait_ms=300) as client:
            async with replay_paused(replica_url):
                await add(publish, pool, 2, "R", "second")
                status = (await client.get("/commands/second")).json()  # the primary: always the latest
                token = status["consistency_token"]
                assert status["status"] == "applied"
                assert await slugs(client, 2) == []  # a replica read: bounded staleness, not the latest
                assert await slugs(client, 2, **{"X-Consistency-Token": token}) == ["R"]  # waited, then primary
                response = await client.get("/users/2/segments", params={"consistency_token": token})
                assert [segment["slug"] for segment in response.json()["segments"]] == ["R"]
                link = (await client.get("/reports/history", params=month())).json()["report_link"]
                assert "2,R,I" not in (await client.get(link)).text  # reports go to the replica too
            await caught_up(settings, replica_url)
            await client.reads.poll()
            replica_reads = count_reads(client.reads.replicas[0])
            assert await slugs(client, 2, **{"X-Consistency-Token": token}) == ["R"]
            assert replica_reads() == 1  # answered by the replica, now that it has replayed the token
            assert (await client.get("/users/1/segments", headers={"X-Consistency-Token": "nonsense"})).status_code \
                == 422


async def test_a_replica_lagging_past_the_bound_gets_no_reads_until_it_catches_up(settings, pool, replica):
    replica_url = url_on_port(settings.database_url, replica.port)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "L", "command_id": "s"})
        await wait_for_outcomes(pool, ["s"])
        await caught_up(settings, replica_url)
        async with api(settings, read_database_urls=[replica_url], max_replica_lag_ms=200) as client:
            async with replay_paused(replica_url):
                await add(publish, pool, 3, "L", "late")
                async with asyncio.timeout(10):
                    while client.reads.replicas[0].state != "lagging":  # noqa: ASYNC110 - the monitor's verdict
                        await asyncio.sleep(0.05)
                assert await slugs(client, 3) == ["L"]  # the primary answers meanwhile
                ready = (await client.get("/readyz")).json()
                assert ready["status"] == "ok" and ready["checks"][f"replica 127.0.0.1:{replica.port}"].startswith(
                    "lagging, lag ")
                metrics = (await client.get("/metrics")).text
                assert f'segmentation_replica_healthy{{replica="127.0.0.1:{replica.port}"}} 0.0' in metrics
            async with asyncio.timeout(10):
                while client.reads.replicas[0].state != "ok":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).json()["checks"][f"replica 127.0.0.1:{replica.port}"].startswith("ok")


async def test_expiry_and_deletion_read_correctly_from_the_replica(settings, pool, replica):
    replica_url = url_on_port(settings.database_url, replica.port)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        for slug in ("TTL", "GONE"):
            await publish.segment({"type": "create_segment", "slug": slug, "command_id": slug})
        await wait_for_outcomes(pool, ["TTL", "GONE"])
        soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
        await add(publish, pool, 4, "TTL", "ttl", expires_at=soon)
        await add(publish, pool, 4, "GONE", "gone")
        await publish.segment({"type": "delete_segment", "slug": "GONE", "command_id": "delete"})
        await wait_for_outcomes(pool, ["delete"])
        await caught_up(settings, replica_url)
        async with api(settings, read_database_urls=[replica_url], max_replica_lag_ms=60_000) as client:
            replica_reads = count_reads(client.reads.replicas[0])
            assert await slugs(client, 4) == ["TTL"]  # deleted: gone on the replica too
            await asyncio.sleep(1.6)  # no expiry worker runs: the read itself hides what has expired
            assert await slugs(client, 4) == []
            assert replica_reads() == 2


@contextlib.asynccontextmanager
async def own_replica(settings, infra, directory):
    """A replica of the session's server for one test (which may stop or promote it), and its
    URL to the test's database, once it has replayed everything; removed afterwards."""
    own = EmbeddedPostgres(directory, replica_of=infra.postgres)
    await asyncio.to_thread(own.start)
    try:
        replica_url = url_on_port(settings.database_url, own.port)
        await caught_up(settings, replica_url)
        yield own, replica_url
    finally:
        await asyncio.to_thread(own.remove)


async def test_a_replica_stopped_under_load_causes_no_error(settings, pool, tmp_path, infra):
    """A replica of its own, stopped while reads run: they move to the primary, none fails."""
    async with own_replica(settings, infra, tmp_path / "short-lived") as (own, replica_url):
        async with api(settings, read_database_urls=[replica_url], max_replica_lag_ms=60_000) as client:
            statuses: list[int] = []

            async def reader(user_id: int) -> None:
                for _ in range(150):
                    statuses.append((await client.get(f"/users/{user_id}/segments")).status_code)
                    await asyncio.sleep(0.005)

            readers = [asyncio.create_task(reader(user_id)) for user_id in range(1, 9)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own.stop, "immediate")
            await asyncio.gather(*readers)
            assert set(statuses) == {200} and len(statuses) == 1200
            assert client.reads.replicas[0].state == "unreachable"


async def test_a_promoted_replica_keeps_its_reads(settings, pool, tmp_path, infra):
    """A replica promoted to primary (as at a failover) replays nothing any more, and its
    pg_last_wal_replay_lsn() stays where recovery ended: it is as new as can be, not lagging."""
    async with own_replica(settings, infra, tmp_path / "promoted") as (_own, replica_url):
        async with api(settings, read_database_urls=[replica_url], max_replica_lag_ms=100) as client:
            replica = client.reads.replicas[0]
            promoted = await asyncpg.connect(replica_url)
            try:
                await promoted.execute("SELECT pg_promote()")
            finally:
                await promoted.close()
            for _ in range(20):  # the old primary goes on writing
                await pool.execute("INSERT INTO users VALUES ($1, now()) ON CONFLICT DO NOTHING", 900_000)
                await pool.execute("DELETE FROM users WHERE user_id = 900000")
                await asyncio.sleep(0.05)
            assert replica.state == "ok", (replica.state, replica.lag_ms)
            before = answered_by(replica.name)
            await slugs(client, 1)
            assert answered_by(replica.name) == before + 1


def answered_by(server: str) -> float:
    return REGISTRY.get_sample_value("segmentation_reads_by_server_total", {"server": server}) or 0.0


async def test_a_replica_that_cannot_serve_holds_no_connections_it_is_not_using(settings, pool):
    """A replica URL whose server answers but cannot serve the hot read (here: a database without
    the tables) is retried on every poll; each attempt gives back its connections."""
    wrong = settings.database_url.rsplit("/", 1)[0] + "/postgres"
    async with api(settings, read_database_urls=[wrong], replica_poll_interval_ms=10) as client:
        await asyncio.sleep(1.5)  # about 150 polls
        held = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres'")
        assert client.reads.replicas[0].state == "unreachable"
    assert held <= 2, f"{held} connections held to the replica that cannot serve"


ROUTES = ["/users/5/segments", "/users/5", "/segments", "/segments/X", "/commands/c-5", "REPORT"]


async def test_a_lost_database_is_a_503_with_retry_after_or_another_server_answers(settings, pool, replica, infra):
    """The API reaches the primary through a proxy that is then cut: without a replica every route
    answers 503 with Retry-After; with one, every read but command status is answered by it."""
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) VALUES ('X', now(), now())")
    await pool.execute("INSERT INTO users VALUES (5, now())")
    replica_url = url_on_port(settings.database_url, replica.port)
    await caught_up(settings, replica_url)
    for replicas in ([], [replica_url]):
        proxy = TcpProxy(infra.postgres.port)
        port = await proxy.start()
        try:
            async with api(settings, database_url=url_on_port(settings.database_url, port), read_database_urls=replicas,
                           max_replica_lag_ms=60_000) as client:
                link = (await client.get("/reports/history", params=month())).json()["report_link"]
                for path in ROUTES:
                    assert (await fetch(client, path, link)).status_code in (200, 404), path
                await proxy.stop()  # the primary is gone for this API
                for path in ROUTES:
                    response = await fetch(client, path, link)
                    if replicas and path != "/commands/c-5":
                        assert response.status_code in (200, 404), (path, response.text)  # the replica answers
                    else:
                        assert response.status_code == 503, (path, response.status_code, response.text)
                        assert response.headers["Retry-After"] == "1"
                        assert "unavailable" in response.json()["detail"]
        finally:
            await proxy.stop()


async def fetch(client, path: str, link: str) -> httpx.Response:
    return await client.get(link if path == "REPORT" else path)


def month() -> dict[str, int]:
    now = datetime.now(UTC)
    return {"year": now.year, "month": now.month}


def count_reads(server):
    """Counts the hot reads a server's lookup answers from now on."""
    calls = []
    original = server.memberships.read

    async def read(key):
        calls.append(key)
        return await original(key)

    server.memberships.read = read
    return lambda: len(calls)
