"""Whom a rollout event did not move, found at report time: a percent change writes the same two
rows whatever its segment's size, and every way an explicit row ends afterwards (a removal, a
re-add, an expiry, the segment's deletion in chunks) keeps the report of that event exact."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from devstack.infra import drop_database, fresh_database
from services.expiry_worker.worker import expire_batch
from services.query_api.reports import stream_report
from shared.db import apply_migrations
from shared.rollout import rollout_bucket
from tests.buckets import user_in_buckets
from tests.integration.test_rollout import apply, report
from tests.support import Publisher, rows_locked, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
SLUG = "AVITO_DISCOUNT_30"
# Covered by create() and not after lower(): lowering moves it out unless it holds an explicit row.
HALF_ONLY = user_in_buckets(SLUG, 2000, 5000)


def create(percent: int = 50) -> dict:
    return {"type": "create_segment", "slug": SLUG, "percent": percent, "command_id": "create"}


def lower() -> dict:
    return {"type": "update_segment", "slug": SLUG, "percent": 20, "command_id": "lower"}


def add(user_id: int, command_id: str, **fields) -> dict:
    return {"type": "update_user_segments", "user_id": user_id, "add": [SLUG], "command_id": command_id, **fields}


async def test_a_member_removed_after_a_percent_change_was_not_moved_by_it(settings, pool, api):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create(), add(HALF_ONLY, "add"), lower(),
                    {"type": "update_user_segments", "user_id": HALF_ONLY, "remove": [SLUG], "command_id": "rm"})
    # Explicit at the change, so it stayed; it left by its removal.
    assert await report(api, HALF_ONLY) == [f"{HALF_ONLY},{SLUG},I,auto,created",
                                            f"{HALF_ONLY},{SLUG},D,manual,manual"]
    assert await pool.fetchval("SELECT count(*) FROM explicit_spans") == 1


async def test_a_member_re_added_after_a_percent_change_was_not_moved_by_it(settings, pool, api):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create(), add(HALF_ONLY, "add"), lower(),
                    add(HALF_ONLY, "again", ttl_seconds=3600))  # restarts the row: added_at is now later
    assert await report(api, HALF_ONLY) == [f"{HALF_ONLY},{SLUG},I,auto,created"]
    assert await pool.fetchval("SELECT count(*) FROM explicit_spans") == 1


async def test_the_all_users_report_agrees_with_each_users_report(settings, pool, api):
    stays = user_in_buckets(SLUG, 2000, 5000, skip=1)  # moved out by the change unless explicit
    users = [HALF_ONLY, stays, user_in_buckets(SLUG, 0, 2000), user_in_buckets(SLUG, 5000, 10000)]
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, *({"type": "create_user", "user_id": u, "command_id": f"u{u}"} for u in users),
                    create(), add(HALF_ONLY, "add"), add(stays, "add2"), lower(),
                    add(HALF_ONLY, "again", ttl_seconds=3600),
                    {"type": "update_user_segments", "user_id": stays, "remove": [SLUG], "command_id": "rm"})
    everyone = await report(api)
    for user_id in users:
        assert [row for row in everyone if row.startswith(f"{user_id},")] == await report(api, user_id)
    assert not any(row.endswith("percent_changed") for row in everyone if row.split(",")[0] in
                   (str(HALF_ONLY), str(stays)))


async def test_a_member_expired_after_a_percent_change_was_not_moved_by_it(settings, pool, api):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create(), add(HALF_ONLY, "add", ttl_seconds=1), lower())
    await asyncio.sleep(1.2)
    async with pool.acquire() as conn:
        assert (await expire_batch(conn, 100)).removed == 1  # the worker removes it, keeping its span
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0
    assert await report(api, HALF_ONLY) == [f"{HALF_ONLY},{SLUG},I,auto,created",
                                            f"{HALF_ONLY},{SLUG},D,manual,ttl"]


async def test_a_percent_change_writes_no_row_per_explicit_member(settings, pool, api):
    members = 3_000
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create(10))
        segment = await pool.fetchval("SELECT id FROM segments WHERE slug = $1", SLUG)
        await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g", members + 100)
        await pool.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                           "SELECT g, $1, now() - interval '1 hour' FROM generate_series(1, $2) AS g", segment, members)
        rows_before = await _table_rows(pool)
        await apply(publish, pool, {"type": "update_segment", "slug": SLUG, "percent": 30, "command_id": "up"})
    assert await _table_rows(pool) == {**rows_before, "rollout_events": rows_before["rollout_events"] + 1}
    moved = [u for u in range(1, members + 101) if 1000 <= rollout_bucket(SLUG, u) < 3000]
    member, registered = next(u for u in moved if u <= members), next(u for u in moved if u > members)
    assert await report(api, member) == []  # explicit all along: the change did not move it
    assert await report(api, registered) == [f"{registered},{SLUG},I,auto,percent_changed"]
    everyone = await report(api)
    assert [row for row in everyone if row.endswith("percent_changed")] == [
        f"{u},{SLUG},I,auto,percent_changed" for u in moved if u > members]


async def _table_rows(pool: asyncpg.Pool) -> dict[str, int]:
    tables = ("rollout_events", "rollout_event_overrides", "explicit_spans", "memberships", "rollout_exclusions")
    return {table: await pool.fetchval(f"SELECT count(*) FROM {table}") for table in tables}


async def test_a_rollout_segment_deleted_in_chunks_moves_no_explicit_member_twice(settings, pool, api):
    settings = settings.model_copy(update={"consumer_segment_removal_chunk": 10})
    members = 45
    covered = [u for u in range(1, members + 1) if rollout_bucket(SLUG, u) < 5000]
    excluded = user_in_buckets(SLUG, 0, 5000, skip=members)  # covered, explicitly removed
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create(),
                    {"type": "update_user_segments", "user_id": excluded, "remove": [SLUG], "command_id": "rm"})
        await publish.users([add(u, f"add{u}") for u in range(1, members + 1)])
        await wait_for_outcomes(pool, [f"add{u}" for u in range(1, members + 1)])
        await apply(publish, pool, {"type": "delete_segment", "slug": SLUG, "command_id": "delete"})
    outcome = await pool.fetchval("SELECT result FROM command_outcomes WHERE command_id = 'delete'")
    assert outcome["explicit_members_removed"] == members  # in five chunks of ten or fewer
    everyone = await report(api)
    for user_id in covered[:3]:  # in by the rollout, then explicitly: one exit, by the deletion of the explicit row
        assert [row for row in everyone if row.startswith(f"{user_id},")] == [
            f"{user_id},{SLUG},I,auto,created", f"{user_id},{SLUG},D,manual,segment_deleted"]
    assert await report(api, excluded) == [f"{excluded},{SLUG},I,auto,created", f"{excluded},{SLUG},D,manual,manual"]
    assert not any(row.endswith("auto,segment_deleted") and int(row.split(",")[0]) <= members for row in everyone)


async def test_a_percent_change_is_stamped_after_the_user_commands_it_waited_for(settings, pool):
    """A user batch holds the segment share-locked while it applies; a percent change waiting
    for that lock takes its time after the batch, so reports order the two as they happened."""
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool, create())
        async with rows_locked(settings, "SELECT 1 FROM segments WHERE slug = $1 FOR SHARE", SLUG):
            await publish.segment(lower())
            await asyncio.sleep(1.0)  # the consumer reads the command and waits for the lock
            released = datetime.now(UTC)
        await wait_for_outcomes(pool, ["lower"])
    executed_at = await pool.fetchval("SELECT executed_at FROM rollout_events WHERE command_id = 'lower'")
    assert executed_at >= released


async def test_events_recorded_before_the_migration_keep_their_lists(infra):
    name = f"spans_{uuid.uuid4().hex[:12]}"
    url = await fresh_database(infra.database_url, name, migrated_before="0013_explicit_spans")
    try:
        conn = await asyncpg.connect(url)
        try:
            listed, moved = user_in_buckets(SLUG, 2000, 5000), user_in_buckets(SLUG, 2000, 5000, skip=1)
            await conn.execute("INSERT INTO users VALUES ($1, '2026-01-01'), ($2, '2026-01-01')", listed, moved)
            segment = await conn.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                          "VALUES ($1, 20, '2026-01-01', '2026-01-02') RETURNING id", SLUG)
            event = await conn.fetchval(
                """INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason,
                                               executed_at, command_id)
                   VALUES ($1, $2, 50, 20, 'percent_changed', '2026-01-02', 'lower') RETURNING id""", segment, SLUG)
            # The old consumer listed whom it did not move; the membership behind it has ended since.
            await conn.execute("INSERT INTO rollout_event_overrides VALUES ($1, $2)", event, listed)
        finally:
            await conn.close()
        apply_migrations(url)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT overrides_kept FROM rollout_events") is True
            body = b"".join([chunk async for chunk in stream_report(conn, 2026, 1, None, release=_nothing)])
        finally:
            await conn.close()
        assert body.decode().splitlines()[1:] == [f"{moved},{SLUG},D,2026-01-02 00:00:00,auto,percent_changed"]
    finally:
        await drop_database(infra.database_url, name)


async def _nothing() -> None:
    return None
