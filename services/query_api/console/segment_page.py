"""What a segment's page shows beyond the segment itself: its explicit members day by day over a
period (entries, exits and the count at each day's end, from its history rows), its rollout
changes, and its most recent members, in keyset pages."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg

# Entries and exits per UTC day of one segment's history rows in [$2, $3): the
# membership_history_segment index, on the months the period touches.
DAILY_SQL = """
SELECT (executed_at AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE operation = 'I') AS entries, count(*) FILTER (WHERE operation = 'D') AS exits
FROM membership_history WHERE segment_slug = $1 AND executed_at >= $2 AND executed_at < $3
GROUP BY 1 ORDER BY 1
"""
# Its members as the history counts them before $2: every entry less every exit (an index-only
# scan of membership_history_segment). A deleted segment of the same slug adds nothing: its
# deletion wrote an exit for each of its members.
MEMBERS_BEFORE_SQL = """
SELECT coalesce(sum(CASE operation WHEN 'I' THEN 1 ELSE -1 END), 0)
FROM membership_history WHERE segment_slug = $1 AND executed_at < $2
"""
ROLLOUT_SQL = """
SELECT e.executed_at, e.old_percent, e.new_percent, e.reason, e.command_id,
       (SELECT o.actor FROM command_outcomes o WHERE o.command_id = e.command_id LIMIT 1) AS actor
FROM rollout_events e WHERE e.segment_id = $1 ORDER BY e.executed_at DESC, e.id DESC LIMIT $2
"""
# A page of its members, most recently added first (memberships_segment_recent), after ($2, $3).
RECENT_MEMBERS_SQL = """
SELECT user_id, added_at, expires_at FROM memberships
WHERE segment_id = $1 AND ($2::timestamptz IS NULL OR (added_at, user_id) < ($2, $3::bigint))
ORDER BY added_at DESC, user_id DESC LIMIT $4
"""
SEGMENT_SQL = "SELECT id, slug, percent, description, created_at FROM segments WHERE deleted_at IS NULL AND slug = $1"
PERIODS = {"30d": 30, "90d": 90}
MONTH = re.compile(r"(\d{4})-(\d{2})")


class NotAPeriod(ValueError):
    pass


def period_bounds(period: str, today: date) -> tuple[date, date]:
    """[first day, day after the last) of `30d`, `90d` (ending today) or a month `YYYY-MM`."""
    if period in PERIODS:
        return today - timedelta(days=PERIODS[period] - 1), today + timedelta(days=1)
    found = MONTH.fullmatch(period)
    if not found or not 1 <= int(found[2]) <= 12 or int(found[1]) < 1970:
        raise NotAPeriod(f"{period[:20]!r} is not a period: 30d, 90d, or a month such as 2026-11")
    first = date(int(found[1]), int(found[2]), 1)
    return first, (first + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True, slots=True)
class Day:
    day: date
    entries: int
    exits: int
    members: int  # explicit members at the day's end


async def daily(pool: asyncpg.Pool, slug: str, first: date, end: date) -> list[Day]:
    """Every day of [first, end), up to today, with its entries, exits and end-of-day members: the
    explicit members the history counts (entries and exits by command, expiry and deletion; the
    rollout's users are not in it)."""
    start, stop = (datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (first, end))
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(DAILY_SQL, slug, start, stop)
        members = await conn.fetchval(MEMBERS_BEFORE_SQL, slug, start)
    counted = {row["day"]: (row["entries"], row["exits"]) for row in rows}
    today = datetime.now(UTC).date()
    result = []
    for n in range((min(end, today + timedelta(days=1)) - first).days):
        day = first + timedelta(days=n)
        entries, exits = counted.get(day, (0, 0))
        members += entries - exits
        result.append(Day(day, entries, exits, members))
    return result


async def rollout_changes(pool: asyncpg.Pool, segment_id: int, limit: int = 20) -> list[asyncpg.Record]:
    return await pool.fetch(ROLLOUT_SQL, segment_id, limit)


async def recent_members(pool: asyncpg.Pool, segment_id: int, after: tuple[datetime, int] | None,
                         limit: int) -> tuple[list[asyncpg.Record], tuple[datetime, int] | None]:
    added_at, user_id = after or (None, None)
    rows = await pool.fetch(RECENT_MEMBERS_SQL, segment_id, added_at, user_id, limit + 1)
    shown = rows[:limit]
    return shown, (shown[-1]["added_at"], shown[-1]["user_id"]) if len(rows) > limit else None


def percent_text(value: Decimal) -> str:
    return f"{value.normalize():f}"
