"""Folding the segments' member-count changes (migration 0010) into one row per segment, so that
reading a count stays a look-up of a row or a few. Rows written meanwhile stay for the next fold:
the DELETE takes only the rows its snapshot sees, and every worker may fold at once (a row one
fold deleted is skipped by the other)."""

from __future__ import annotations

import asyncpg

FOLD_SQL = """
WITH folded AS (
    DELETE FROM segment_member_counts
    WHERE segment_id IN (SELECT segment_id FROM segment_member_counts GROUP BY segment_id HAVING count(*) > 1)
    RETURNING segment_id, members)
INSERT INTO segment_member_counts (segment_id, members)
SELECT segment_id, sum(members) FROM folded GROUP BY segment_id HAVING sum(members) <> 0
"""


async def fold(conn: asyncpg.Connection) -> None:
    await conn.execute(FOLD_SQL)
