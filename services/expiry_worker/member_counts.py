"""Folding the segments' member-count changes (migrations 0010, 0011) into one row per segment, so
that reading a count stays a look-up of a row or a few, and adding the changes tagged with a day
to that day's change in segment_member_days (the list's trends). Rows written meanwhile stay for
the next fold: the DELETE takes only the rows its snapshot sees, and every worker may fold at
once (a row one fold deleted is skipped by the other; days are added to, never overwritten)."""

from __future__ import annotations

import asyncpg

# Days kept: the trend reaches back 30, and a few more cost nothing.
DAYS_KEPT = 40

FOLD_SQL = """
WITH folded AS (
    DELETE FROM segment_member_counts
    WHERE segment_id IN (SELECT segment_id FROM segment_member_counts GROUP BY segment_id
                         HAVING count(*) > 1 OR bool_or(day IS NOT NULL))
    RETURNING segment_id, members, day),
days AS (
    INSERT INTO segment_member_days (segment_id, day, change)
    SELECT segment_id, day, sum(members) FROM folded WHERE day IS NOT NULL
    GROUP BY segment_id, day ORDER BY segment_id, day
    ON CONFLICT (segment_id, day) DO UPDATE SET change = segment_member_days.change + excluded.change)
INSERT INTO segment_member_counts (segment_id, members)
SELECT segment_id, sum(members) FROM folded GROUP BY segment_id HAVING sum(members) <> 0
"""

FORGET_SQL = f"DELETE FROM segment_member_days WHERE day < (now() AT TIME ZONE 'UTC')::date - {DAYS_KEPT}"


async def fold(conn: asyncpg.Connection) -> None:
    await conn.execute(FOLD_SQL)
    await conn.execute(FORGET_SQL)
