"""Connections are opened and readied off the request path: the consumer's pool opens every
connection at startup, each prepared for the write path, and no pool replaces a healthy
connection after a number of queries (asyncpg's default replaces it after 50,000)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.command_consumer import repository
from services.command_consumer.batch import apply_batch
from services.query_api.readmodel import USER_SEGMENTS_SQL, create_lookup_pool
from shared.db import create_pool
from tests.integration.test_batch_writes import NOW, SEGMENT_BATCH, parsed

pytestmark = pytest.mark.integration

ASYNCPG_DEFAULT_MAX_QUERIES = 50_000


@contextlib.asynccontextmanager
async def every_connection(pool: asyncpg.Pool, count: int) -> AsyncIterator[list]:
    """`count` connections of the pool held at once (so each is a different one), released after."""
    held = [await pool.acquire() for _ in range(count)]
    try:
        yield held
    finally:
        for conn in held:
            await pool.release(conn)


async def server_side_statements(conn) -> dict[str, str]:
    """The write path's statements prepared in this connection's session: statement → its name."""
    rows = await conn.fetch("SELECT name, statement FROM pg_prepared_statements WHERE statement = ANY($1::text[])",
                            list(repository.WRITE_PATH_STATEMENTS))
    return {row["statement"]: row["name"] for row in rows}


async def test_the_consumer_opens_and_prepares_every_connection_before_its_first_batch(settings, monkeypatch):
    monkeypatch.setattr("services.command_consumer.batch._clock", lambda: NOW)
    pool = await repository.open_pool(settings, settings.topic_partitions)
    try:
        expected = max(settings.db_pool_max_size, settings.topic_partitions + 2)
        assert pool.get_size() == expected
        assert pool.get_idle_size() == expected  # open, nobody waiting for one to be made
        async with pool.acquire() as conn:
            await apply_batch(conn, parsed(settings, settings.segments_commands_topic, SEGMENT_BATCH))
        # Every connection, not only the one used above: each sends the batch's own statements
        # and nothing else (no look-up of a type it has not seen).
        async with every_connection(pool, expected) as held:
            for index, conn in enumerate(held):
                prepared_before = await server_side_statements(conn)
                assert len(prepared_before) == len(repository.WRITE_PATH_STATEMENTS)  # prepared as it opened
                sent: list[str] = []
                conn.add_query_logger(lambda record, sent=sent: sent.append(record.query))
                user = 1_000 + index
                batch = parsed(settings, settings.assignments_commands_topic, [
                    {"type": "create_user", "user_id": user, "command_id": f"c{user}"},
                    {"type": "update_user_segments", "user_id": user, "add": ["A"], "ttl_seconds": 60,
                     "command_id": f"a{user}"}], first_offset=10 * index)
                processed = await apply_batch(conn, batch, settings.outcome_retention)
                assert [p.outcome.status for p in processed] == ["applied", "applied"]
                await asyncio.sleep(0)  # asyncpg calls query loggers soon after, not in the query
                assert sent[0].startswith("BEGIN") and sent[-1].startswith("COMMIT"), sent
                assert sent[1:-1] == list(repository.WRITE_PATH_STATEMENTS), sent
                # ...as the statements prepared at startup: none parsed again in the batch's path.
                assert await server_side_statements(conn) == prepared_before
    finally:
        await pool.close()


async def test_the_hot_reads_connections_have_its_query_prepared_as_they_open(settings):
    pool = await create_lookup_pool(settings.database_url, 2)
    try:
        async with every_connection(pool, 2) as held:
            for conn in held:
                prepared = await conn.fetchval("SELECT array_agg(statement) FROM pg_prepared_statements")
                assert USER_SEGMENTS_SQL in prepared
    finally:
        await pool.close()


async def test_a_connection_is_not_replaced_after_many_queries(settings):
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            for _ in range(ASYNCPG_DEFAULT_MAX_QUERIES):
                await conn.execute("SELECT 1")
        async with pool.acquire() as conn:  # asyncpg's default would have closed it on release
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend
    finally:
        await pool.close()


async def test_a_database_without_the_schema_stops_the_consumer_with_what_to_do(settings):
    """Its statements are prepared as the pool opens, so a server that was never migrated is
    named at startup, not in the first batch."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("DROP TABLE rollout_exclusions CASCADE")
    finally:
        await conn.close()
    with pytest.raises(SystemExit, match=r"does not have the schema .*rollout_exclusions.*apply the migrations"):
        await repository.open_pool(settings, settings.topic_partitions)
