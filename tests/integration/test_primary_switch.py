"""Writers across a change of primary: a connection URL naming several hosts reaches the one that
takes writes, and a connection that finds its server read-only (a primary demoted behind an
address that still leads to it) is dropped and the work retried, never skipped or doubled."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from devstack.embedded import EmbeddedPostgres
from devstack.infra import drop_database, fresh_database
from devstack.processes import free_port
from services.expiry_worker.worker import ExpiryWorker
from shared.db import apply_migrations, create_pool
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration


def with_hosts_before(url: str, *dead_ports: int) -> str:
    """`url` naming first hosts where nothing listens, then its own, writes asked of the primary."""
    return listing_hosts(*(re.sub(r"@[^/]+/", f"@127.0.0.1:{port}/", url) for port in dead_ports), url)


def listing_hosts(*urls: str) -> str:
    """One URL naming the host:port of each of `urls` (same user and database), writes asked of
    the primary."""
    first = urls[0]
    prefix, _, rest = first.partition("@")
    path = rest.partition("/")[2]
    hosts = ",".join(url.partition("@")[2].partition("/")[0] for url in urls)
    return f"{prefix}@{hosts}/{path}{'&' if '?' in path else '?'}target_session_attrs=read-write"


async def test_a_url_naming_several_hosts_reaches_the_one_that_takes_writes(settings):
    url = with_hosts_before(settings.database_url, free_port())
    assert await asyncio.to_thread(apply_migrations, url) == []  # the migrations' driver reaches it too
    multi = settings.model_copy(update={"database_url": url})
    pool = await create_pool(url, min_size=1, max_size=4)
    try:
        async with Publisher(multi) as publish, running_consumer(multi, pool):
            await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
            await publish.user({"type": "update_user_segments", "user_id": 1, "add": ["A"], "command_id": "u"})
            outcomes = await wait_for_outcomes(pool, ["a", "u"])
        assert outcomes["u"]["status"] == "applied"
    finally:
        await pool.close()


async def set_read_only(admin_url: str, read_only: bool) -> None:
    """Every session of the server read-only (as on a standby: `target_session_attrs=read-write`
    passes it by), or writable again."""
    admin = await asyncpg.connect(admin_url, server_settings={"default_transaction_read_only": "off"})
    try:
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on" if read_only
                            else "ALTER SYSTEM RESET default_transaction_read_only")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def server_read_only(admin_url: str):
    """Every session of the server read-only until the block ends."""
    await set_read_only(admin_url, True)
    try:
        yield
    finally:
        await set_read_only(admin_url, False)


async def test_writers_drop_connections_to_a_read_only_server_and_lose_nothing(infra, settings, pool):
    if infra.postgres is None:
        pytest.skip("makes the embedded PostgreSQL the test session owns read-only for a while")
    users = range(1, 201)
    expiring = range(1001, 1051)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "A", "command_id": "a"})
        await wait_for_outcomes(pool, ["a"])
        worker = ExpiryWorker(pool, batch_size=10, max_sleep_seconds=0.1)
        expiry = asyncio.create_task(worker.run())
        try:
            await publish.users([{"type": "update_user_segments", "user_id": user, "add": ["A"],
                                  "command_id": f"before-{user}"} for user in users])
            await wait_for_outcomes(pool, [f"before-{user}" for user in users])
            segment_id = await pool.fetchval("SELECT id FROM segments WHERE slug = 'A'")
            expires_at = datetime.now(UTC) + timedelta(seconds=1)  # while the server is read-only
            await pool.executemany("INSERT INTO memberships (user_id, segment_id, added_at, expires_at) "
                                   "VALUES ($1, $2, now(), $3)", [(user, segment_id, expires_at) for user in expiring])
            async with server_read_only(infra.database_url):
                await publish.users([{"type": "update_user_segments", "user_id": user, "remove": ["A"],
                                      "command_id": f"during-{user}"} for user in users])
                await asyncio.sleep(3)  # the memberships expire; every write meets a read-only server
                stored = await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id LIKE 'during-%'")
                left = await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id > 1000")
                assert (stored, left) == (0, len(expiring))
            await wait_for_outcomes(pool, [f"during-{user}" for user in users])
            deadline = time.monotonic() + 30
            while await pool.fetchval("SELECT count(*) FROM memberships WHERE user_id > 1000"):
                assert time.monotonic() < deadline, "the expiry worker did not resume"
                await asyncio.sleep(0.1)
        finally:
            worker.stop()
            await expiry
    rows = await pool.fetch("SELECT user_id, operation, reason, count(*) AS n FROM membership_history "
                            "GROUP BY user_id, operation, reason")
    assert {(row["user_id"], row["operation"], row["reason"]) for row in rows} == (
        {(user, "I", "manual") for user in users} | {(user, "D", "manual") for user in users}
        | {(user, "D", "ttl") for user in expiring})
    assert all(row["n"] == 1 for row in rows)  # nothing skipped, nothing applied twice


async def test_a_connection_left_on_a_demoted_primary_is_dropped_and_the_new_primary_takes_the_writes(
        infra, settings, tmp_path):
    if infra.postgres is None:
        pytest.skip("makes the embedded PostgreSQL the test session owns read-only for a while")
    other = EmbeddedPostgres(tmp_path / "other")  # the standby that is promoted
    other_admin = await asyncio.to_thread(other.start)
    name = f"switch_{free_port()}"
    try:
        first = await fresh_database(infra.database_url, name)
        second = await fresh_database(other_admin, name)
        await set_read_only(other_admin, True)
        both = listing_hosts(first, second)  # the primary first, the standby second
        switched = settings.model_copy(update={"database_url": both})
        pool = await create_pool(both, min_size=2, max_size=4)
        try:
            async with Publisher(switched) as publish, running_consumer(switched, pool):
                await publish.segment({"type": "create_segment", "slug": "BEFORE", "command_id": "before"})
                await wait_for_outcomes(pool, ["before"])
                await set_read_only(infra.database_url, True)  # the failover: the primary demoted,
                await set_read_only(other_admin, False)  # the standby promoted
                try:
                    await publish.segment({"type": "create_segment", "slug": "AFTER", "command_id": "after"})
                    async with await create_pool(second, min_size=1, max_size=1) as promoted:
                        await wait_for_outcomes(promoted, ["after"], timeout=30)
                finally:
                    await set_read_only(infra.database_url, False)
        finally:
            await pool.close()
        on_first = await asyncpg.connect(first)
        on_second = await asyncpg.connect(second)
        try:
            assert await on_first.fetchval("SELECT array_agg(slug ORDER BY slug) FROM segments") == ["BEFORE"]
            assert await on_second.fetchval("SELECT array_agg(slug ORDER BY slug) FROM segments") == ["AFTER"]
        finally:
            await on_first.close()
            await on_second.close()
    finally:
        await drop_database(infra.database_url, name)
        await asyncio.to_thread(other.remove)
