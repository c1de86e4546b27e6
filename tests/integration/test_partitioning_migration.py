"""The partitioning migration (0005) on a database that already holds months of data: every row
moves into a partition, none is lost, and every month's report is the one a database that never
had the old schema gives for the same rows."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from devstack.infra import drop_database, fresh_database
from services.query_api.reports import stream_report
from shared.db import apply_migrations

pytestmark = pytest.mark.integration
PARTITIONING = "0005_partitioned_history_and_inbox"
MONTHS = [(2025, 6), (2025, 7), (2025, 8), (2025, 9)]


@pytest.fixture
async def old_database(infra):
    """A database at the schema before partitioning."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    yield await fresh_database(infra.database_url, name, migrated_before=PARTITIONING)
    await drop_database(infra.database_url, name)


@pytest.fixture
async def new_database(infra):
    """A database at today's schema, for the reports the migrated one must give."""
    name = f"control_{uuid.uuid4().hex[:12]}"
    yield await fresh_database(infra.database_url, name)
    await drop_database(infra.database_url, name)


async def seed(conn: asyncpg.Connection) -> None:
    """Four months of explicit history, rollout events with overrides, users and outcomes."""
    await conn.execute("INSERT INTO users SELECT g, '2025-05-01' FROM generate_series(1, 500) AS g")
    segment = await conn.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                  "VALUES ('ROLL', 20, '2025-06-02', '2025-06-02') RETURNING id")
    for year, month in MONTHS:
        await conn.execute(
            """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason,
                                               command_id)
               SELECT g % 500 + 1, 'SEG_' || (g % 7), CASE WHEN g % 3 = 0 THEN 'D' ELSE 'I' END,
                      make_timestamptz($1::int, $2::int, 1, 0, 0, 0, 'UTC') + (g % 600) * interval '1 hour', 'manual',
                      'manual', 'c-' || $1::int || $2::int || g
               FROM generate_series(1, 3000) AS g""", year, month)
        event = await conn.fetchval(
            """INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason, executed_at,
                                           command_id)
               VALUES ($1, 'ROLL', 10, 20, 'percent_changed',
                       make_timestamptz($2::int, $3::int, 15, 0, 0, 0, 'UTC'), 'e')
               RETURNING id""", segment, year, month)
        await conn.execute("INSERT INTO rollout_event_overrides SELECT $1, g FROM generate_series(1, 40) AS g", event)
        await conn.execute(
            """INSERT INTO command_outcomes (command_id, type, status, processed_at, source_topic, source_partition,
                                             source_offset, actor)
               SELECT 'o-' || $1::int || $2::int || g, 'create_user', 'applied',
                      make_timestamptz($1::int, $2::int, 3, 0, 0, 0, 'UTC') + g * interval '1 minute', 'a', 0, g, 'k'
               FROM generate_series(1, 2000) AS g""", year, month)


async def snapshot(conn: asyncpg.Connection) -> dict:
    """Counts and each table's content digest."""
    state = {}
    # The columns the tables had before partitioning (later migrations add columns, empty for old rows).
    history = "id, user_id, segment_slug, operation, executed_at, source, reason, command_id"
    events = "id, segment_id, segment_slug, old_percent, new_percent, reason, executed_at, command_id"
    for table, order, columns in (
            ("membership_history", "id", history),
            ("command_outcomes", "command_id", ""), ("rollout_events", "id", events),
            ("rollout_event_overrides", "event_id, user_id", "*")):
        state[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")
        state[f"{table} digest"] = await conn.fetchval(
            f"SELECT md5(string_agg(row_to_json(t)::text, '|' ORDER BY {order})) FROM "
            f"(SELECT {columns} FROM {table}) t" if table != "command_outcomes" else
            "SELECT md5(string_agg(concat_ws(',', command_id, type, status, processed_at, source_offset, actor), '|' "
            "ORDER BY command_id)) FROM command_outcomes")
    return state


async def reports(conn: asyncpg.Connection) -> dict:
    """Every month's report, all users and one user, by today's code."""
    state = {}
    for year, month in MONTHS:
        for user_id in (None, 42):
            chunks = [chunk async for chunk in stream_report(conn, year, month, user_id, release=_nothing)]
            state[f"report {year}-{month} user {user_id}"] = b"".join(chunks)
    return state


async def _nothing() -> None:
    return None


async def test_existing_months_move_into_partitions_with_nothing_lost(old_database, new_database):
    conn = await asyncpg.connect(old_database)
    try:
        await seed(conn)
        before = await snapshot(conn)
        largest_id = await conn.fetchval("SELECT max(id) FROM membership_history")
    finally:
        await conn.close()
    assert before["membership_history"] == 12_000 and before["command_outcomes"] == 8_000
    conn = await asyncpg.connect(new_database)
    try:
        await seed(conn)
        expected = await reports(conn)
    finally:
        await conn.close()
    assert all(len(report.splitlines()) > 1 for report in expected.values())

    assert apply_migrations(old_database)[0] == PARTITIONING  # then the migrations that came after it

    conn = await asyncpg.connect(old_database)
    try:
        assert await snapshot(conn) == before
        assert await reports(conn) == expected
        homes = await conn.fetch("SELECT tableoid::regclass::text AS part, count(*) FROM membership_history "
                                 "GROUP BY 1 ORDER BY 1")
        assert [(row["part"], row["count"]) for row in homes] == [
            (f"membership_history_p{year}{month:02d}", 3000) for year, month in MONTHS]
        assert await conn.fetchval("SELECT count(*) FROM command_outcomes_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM command_outcomes_before_migration") == 8_000
        # New history rows continue the old numbering.
        new_id = await conn.fetchval(
            "INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason) "
            "VALUES (1, 'S', 'I', now(), 'manual', 'manual') RETURNING id")
        assert new_id > largest_id
    finally:
        await conn.close()
