"""Each segment's size day by day (migration 0011), behind the 30-day trend in the segments list:
the days before the upgrade come from the history, the days after from the count triggers, and
the trend equals the sizes the history gives at each day's end. The migration never makes a
writer wait more than its lock timeout, and run again it adds nothing twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from devstack.infra import drop_database, fresh_database
from services.expiry_worker import member_counts
from services.query_api.console.queries import TREND_DAYS, segments_page
from shared.db import apply_migrations
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
DAYS = "0011_segment_member_days"


@pytest.fixture
async def old_database(infra):
    """A database at the schema before the days were kept, and its URL."""
    name = f"days_{uuid.uuid4().hex[:12]}"
    yield await fresh_database(infra.database_url, name, migrated_before=DAYS)
    await drop_database(infra.database_url, name)


async def seed_history(conn: asyncpg.Connection, today: date) -> dict[date, int]:
    """Segment GROW, created 40 days ago: on each of the 35 days before today some users entered
    and some left (history and memberships agree). Returns its size at each day's end."""
    created = datetime.combine(today - timedelta(days=40), datetime.min.time(), UTC)
    segment = await conn.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                  "VALUES ('GROW', 0, $1, $1) RETURNING id", created)
    members: set[int] = set()
    sizes, user = {}, 0
    for back in range(35, 0, -1):
        day = today - timedelta(days=back)
        noon = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=12)
        entering = list(range(user + 1, user + 1 + back % 7 + 3))
        user += len(entering)
        leaving = sorted(members)[: back % 3]
        await conn.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason) VALUES ($1, 'GROW', $2, $3, 'manual', 'manual')",
                               [(u, "I", noon) for u in entering] + [(u, "D", noon) for u in leaving])
        members |= set(entering)
        members -= set(leaving)
        sizes[day] = len(members)
    await conn.executemany("INSERT INTO memberships (user_id, segment_id, added_at) "
                           "VALUES ($1, $2, now())", [(u, segment) for u in sorted(members)])
    return sizes


def expected_trend(sizes: dict[date, int], today: date, now: int) -> tuple[int, ...]:
    return (*(sizes[today - timedelta(days=back)] for back in range(TREND_DAYS - 1, 0, -1)), now)


async def trend_of(pool: asyncpg.Pool, slug: str) -> tuple[int, ...]:
    page = await segments_page(pool, slug, "slug", None)
    return next(row.trend for row in page.rows if row.slug == slug)


async def test_days_before_the_upgrade_come_from_the_history_and_later_ones_from_the_triggers(
        old_database, settings):
    conn = await asyncpg.connect(old_database)
    pool = await asyncpg.create_pool(old_database, min_size=1, max_size=2)
    try:
        today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        sizes = await seed_history(conn, today)
        await conn.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, 400) AS g")
        assert apply_migrations(old_database)[0] == DAYS  # and the ones after it
        now = await conn.fetchval("SELECT count(*) FROM memberships")
        assert now == sizes[today - timedelta(days=1)]
        assert await trend_of(pool, "GROW") == expected_trend(sizes, today, now)

        # Run again after a crash before yoyo recorded it: the days are not added twice.
        await conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = $1", DAYS)
        assert apply_migrations(old_database) == [DAYS]
        assert await trend_of(pool, "GROW") == expected_trend(sizes, today, now)

        # Today's changes come from the triggers, tagged with today, and fold into today's row.
        segment = await conn.fetchval("SELECT id FROM segments WHERE slug = 'GROW'")
        await conn.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                           "SELECT g, $1, now() FROM generate_series(300, 311) AS g", segment)
        await conn.execute("DELETE FROM memberships WHERE segment_id = $1 AND user_id IN (300, 301)", segment)
        assert await conn.fetch("SELECT day, members FROM segment_member_counts WHERE day IS NOT NULL "
                                "ORDER BY members") == [(today, -2), (today, 12)]
        trend = await trend_of(pool, "GROW")
        assert trend == expected_trend(sizes, today, now + 10)
        await conn.execute("INSERT INTO segment_member_days VALUES ($1, $2, 5)", segment, today - timedelta(days=45))
        await member_counts.fold(conn)
        assert await conn.fetchval("SELECT count(*) FROM segment_member_counts WHERE segment_id = $1", segment) == 1
        assert await conn.fetchval("SELECT change FROM segment_member_days WHERE segment_id = $1 AND day = $2",
                                   segment, today) == 10
        assert await conn.fetchval("SELECT min(day) FROM segment_member_days") >= today - timedelta(
            days=member_counts.DAYS_KEPT)
        assert await trend_of(pool, "GROW") == trend
    finally:
        await pool.close()
        await conn.close()


async def test_a_segment_created_this_month_trends_from_its_first_day(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "NEW", "command_id": "new"})
        await wait_for_outcomes(pool, ["new"])
        adds = [{"type": "update_user_segments", "user_id": u, "add": ["NEW"], "command_id": f"add-{u}"}
                for u in range(1, 8)]
        await publish.users(adds)
        await wait_for_outcomes(pool, [c["command_id"] for c in adds])
    # Created today: one point, no line (the list says "new today").
    assert await trend_of(pool, "NEW") == (7,)
    # Created three days ago, with two of today's members added the day before yesterday.
    segment = await pool.fetchval("UPDATE segments SET created_at = now() - interval '3 days' "
                                  "WHERE slug = 'NEW' RETURNING id")
    today = await pool.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    # The counts are changes, one row per writing transaction: move two of today's to that day.
    await pool.executemany("INSERT INTO segment_member_counts (segment_id, members, day) VALUES ($1, $2, $3)",
                           [(segment, -2, today), (segment, 2, today - timedelta(days=2))])
    assert await trend_of(pool, "NEW") == (0, 2, 2, 7)


async def test_the_migration_never_holds_writers_longer_than_its_lock_timeout(old_database):
    """A transaction that wrote memberships keeps its lock on the counts for three seconds; the
    migration queues for the column's lock behind it. Another writer arriving meanwhile waits for
    the first transaction, never longer than the migration's one-second lock timeout beyond it."""
    holder = await asyncpg.connect(old_database)
    writer = await asyncpg.connect(old_database)
    try:
        segment = await holder.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                        "VALUES ('HELD', 0, now(), now()) RETURNING id")
        held = holder.transaction()
        await held.start()
        await holder.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                             "VALUES (1, $1, now())", segment)
        migrating = asyncio.create_task(asyncio.to_thread(apply_migrations, old_database))
        await asyncio.sleep(0.5)  # the migration is waiting for its lock
        started = time.monotonic()

        async def release_later() -> None:
            await asyncio.sleep(3)
            await held.commit()

        release = asyncio.create_task(release_later())
        await writer.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                             "VALUES (2, $1, now())", segment)
        waited = time.monotonic() - started
        await release
        assert waited < 1.5, f"a writer waited {waited:.1f} s behind the migration"
        assert (await migrating)[0] == DAYS
        assert await writer.fetchval("SELECT sum(members) FROM segment_member_counts WHERE segment_id = $1",
                                     segment) == 2
    finally:
        await holder.close()
        await writer.close()
