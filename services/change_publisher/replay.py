"""Publishing changes recorded before the outbox existed, or again: `replay --from TIME` queues the
history and rollout events from TIME on (until --until, or now) in front of everything already
waiting in the outbox, so the publisher sends them first, in the order of the month's report
(executed_at, then id). Event ids are those of the first publication: readers that saw a change
before drop it as a duplicate.

Meant for a new deployment on old data (migrate, replay, then start the publisher); while live
changes flow, a replayed change can follow a later live change of the same user that was already
published, and readers must order by executed_at within what they replay."""

from __future__ import annotations

from datetime import datetime

import asyncpg

REPLAY_LOCK_KEY = 0x5E6_C4A6F

# Both sources as outbox rows, for one month: reading month by month bounds each statement, and
# the progress bar moves between them.
_SOURCES = """
SELECT 'membership' AS kind, id AS source_id, user_id, segment_slug, operation, executed_at, source, reason,
       command_id, expires_at, NULL::numeric AS from_percent, NULL::numeric AS to_percent
FROM membership_history WHERE executed_at >= $1 AND executed_at < $2
UNION ALL
SELECT 'rollout', id, NULL, segment_slug, NULL, executed_at, NULL, reason, command_id, NULL, old_percent, new_percent
FROM rollout_events WHERE executed_at >= $1 AND executed_at < $2
"""

COUNT_SQL = f"SELECT count(*) FROM ({_SOURCES}) AS changes"

# Outbox entries of up to CHUNK changes each, numbered from $3 up: below every entry already
# waiting, so the publisher sends these first.
CHUNK = 5_000
QUEUE_SQL = f"""
INSERT INTO membership_changes_outbox (seq, changes, kinds, source_ids, user_ids, segment_slugs, operations,
                                       executed_ats, sources, reasons, command_ids, expires_ats, from_percents,
                                       to_percents)
SELECT $3 + chunk, count(*), array_agg(kind), array_agg(source_id), array_agg(user_id), array_agg(segment_slug),
       array_agg(operation::text), array_agg(executed_at), array_agg(source), array_agg(reason), array_agg(command_id),
       array_agg(expires_at), array_agg(from_percent), array_agg(to_percent)
FROM (SELECT *, (row_number() OVER (ORDER BY executed_at, kind, source_id) - 1) / {CHUNK} AS chunk
      FROM ({_SOURCES}) AS changes
      ORDER BY executed_at, kind, source_id) AS numbered
GROUP BY chunk
"""


def months(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at month boundaries."""
    ranges = []
    lower = start
    while lower < end:
        first = lower.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        upper = min(first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1), end)
        ranges.append((lower, upper))
        lower = upper
    return ranges


async def replay(conn: asyncpg.Connection, start: datetime, end: datetime, progress=None) -> int:
    """Queues the changes recorded in [start, end) in one transaction; returns how many.
    `progress(done, total)` is called after each month."""
    ranges = months(start, end)
    async with conn.transaction():
        # One replay at a time. Live changes keep flowing: theirs are positive, these go below.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", REPLAY_LOCK_KEY)
        counts = [await conn.fetchval(COUNT_SQL, lower, upper) for lower, upper in ranges]
        total = sum(counts)
        entries = sum(-(-count // CHUNK) for count in counts)
        lowest = await conn.fetchval("SELECT min(seq) FROM membership_changes_outbox")
        seq = min(lowest if lowest is not None else 1, 1) - entries - 1
        done = 0
        for (lower, upper), count in zip(ranges, counts, strict=True):
            await conn.execute(QUEUE_SQL, lower, upper, seq)
            seq += -(-count // CHUNK)
            done += count
            if progress:
                progress(done, total)
    return total
