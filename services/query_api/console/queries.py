"""What the console reads beyond the API's own reads: segments with their member counts, a user's
month of history as rows, an import's outcomes, and the trace a command's record carries."""

from __future__ import annotations

import asyncio
import contextlib
import csv
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.query_api.console.import_tokens import ImportJob
from services.query_api.reports import check_month_kept, month_bounds, stream_report
from shared.kafka import kafka_options, start_client
from shared.settings import KafkaSettings

# How many users the service knows: counted while that is cheap, the planner's estimate beyond.
KNOWN_USERS_SQL = """
SELECT CASE WHEN c.reltuples > 1000000 THEN c.reltuples::bigint ELSE (SELECT count(*) FROM users) END
FROM pg_class c WHERE c.oid = 'users'::regclass
"""

SEGMENTS_PER_PAGE = 50
# The orders the list offers: (ORDER BY, the keyset condition for the rows after a cursor). Every
# order ends on the slug, unique among live segments, so a cursor names one place in the list.
SEGMENT_ORDERS = {
    "slug": ("s.slug", "s.slug > $2"),
    "percent": ("s.percent DESC, s.slug",
                "(s.percent < $4::numeric OR (s.percent = $4::numeric AND s.slug > $2))"),
}
# A page of $3 live segments matching the search ($1, a LIKE pattern, or NULL), after the cursor
# ($2 the slug, and $4 the percent when the order needs it; NULL: from the start). For the rows
# shown: their explicit members (kept as they change, migration 0010), and the users the rollout
# would cover but who were removed.
_SEGMENTS_PAGE = """
WITH page AS (
    SELECT s.id, s.slug, s.percent, s.description, s.created_at FROM segments s
    WHERE s.deleted_at IS NULL
      AND ($1::text IS NULL OR s.slug ILIKE $1 OR s.description ILIKE $1)
      AND ($2::text IS NULL OR {after})
    ORDER BY {order} LIMIT $3)
SELECT s.id, s.slug, s.percent, s.description, s.created_at,
       (SELECT coalesce(sum(c.members), 0) FROM segment_member_counts c WHERE c.segment_id = s.id) AS members,
       (SELECT count(*) FROM rollout_exclusions x WHERE x.segment_id = s.id) AS excluded
FROM page s ORDER BY {order}
"""
SEGMENTS_PAGE_SQL = {name: _SEGMENTS_PAGE.format(order=order, after=after)
                     for name, (order, after) in SEGMENT_ORDERS.items()}
# Largest first: every matching segment's kept size (a row or a few each), then the page after
# the cursor ($4 the size, $2 the slug).
SEGMENTS_PAGE_SQL["size"] = """
WITH sized AS (
    SELECT s.id, s.slug, s.percent, s.description, s.created_at,
           coalesce((SELECT sum(c.members) FROM segment_member_counts c WHERE c.segment_id = s.id), 0) AS members
    FROM segments s
    WHERE s.deleted_at IS NULL AND ($1::text IS NULL OR s.slug ILIKE $1 OR s.description ILIKE $1)),
page AS (
    SELECT * FROM sized s
    WHERE $2::text IS NULL OR s.members < $4::bigint OR (s.members = $4::bigint AND s.slug > $2)
    ORDER BY s.members DESC, s.slug LIMIT $3)
SELECT s.id, s.slug, s.percent, s.description, s.created_at, s.members,
       (SELECT count(*) FROM rollout_exclusions x WHERE x.segment_id = s.id) AS excluded
FROM page s ORDER BY s.members DESC, s.slug
"""
# The shown segments' size changes by UTC day since $2, folded (segment_member_days) or not yet.
SEGMENT_DAYS_SQL = """
SELECT segment_id, day, sum(change)::bigint AS change FROM (
    SELECT segment_id, day, change FROM segment_member_days WHERE segment_id = ANY($1::bigint[]) AND day > $2
    UNION ALL
    SELECT segment_id, day, members FROM segment_member_counts WHERE segment_id = ANY($1::bigint[]) AND day > $2
) changes GROUP BY segment_id, day
"""
TREND_DAYS = 30
SEGMENTS_MATCHING_SQL = """
SELECT count(*) FROM segments s
WHERE s.deleted_at IS NULL AND ($1::text IS NULL OR s.slug ILIKE $1 OR s.description ILIKE $1)
"""


@dataclass(frozen=True, slots=True)
class SegmentRow:
    slug: str
    percent: Decimal
    description: str | None
    created_at: datetime
    members: int
    excluded: int
    rollout_users: int  # the known users the rollout is expected to cover (it hashes uniformly)
    trend: tuple[int, ...]  # explicit members at the end of each UTC day since it was created, of the
    #                         last TREND_DAYS, the last one now


@dataclass(frozen=True, slots=True)
class SegmentPage:
    rows: list[SegmentRow]
    matching: int  # live segments the search matches, on every page
    known_users: int
    next_after: tuple[str, Decimal | int] | None  # the last row's slug and sort key when more follow


def like_pattern(search: str) -> str | None:
    """Text found anywhere, taken literally (LIKE's wildcards and escape character escaped)."""
    search = search.strip()
    if not search:
        return None
    return "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def size_trend(now: int, changes: dict[date, int], today: date, created: date) -> tuple[int, ...]:
    """Sizes at the end of the last TREND_DAYS days (today's: now), from the size now and each
    day's change: a day's end is the next day's end less that next day's change."""
    sizes = [now]
    for back in range(TREND_DAYS - 1):
        day = today - timedelta(days=back)
        if day <= created:
            break
        sizes.append(sizes[-1] - changes.get(day, 0))
    return tuple(reversed(sizes))


async def segments_page(pool: asyncpg.Pool, search: str, order: str, after: tuple[str, Decimal | int] | None,
                        per_page: int = SEGMENTS_PER_PAGE) -> SegmentPage:
    """`after`: the slug and the sort key (percent, size) of the row before the page."""
    pattern = like_pattern(search)
    slug, key = after if after else (None, None)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(SEGMENTS_PAGE_SQL[order], pattern, slug, per_page + 1,
                                *([key] if order != "slug" else []))
        more, rows = len(rows) > per_page, rows[:per_page]
        matching = await conn.fetchval(SEGMENTS_MATCHING_SQL, pattern)
        known = await conn.fetchval(KNOWN_USERS_SQL) or 0
        today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        changes: dict[int, dict[date, int]] = {}
        for change in await conn.fetch(SEGMENT_DAYS_SQL, [row["id"] for row in rows],
                                       today - timedelta(days=TREND_DAYS)):
            changes.setdefault(change["segment_id"], {})[change["day"]] = change["change"]
    shown = [SegmentRow(row["slug"], row["percent"], row["description"], row["created_at"], row["members"],
                        row["excluded"], round(known * float(row["percent"]) / 100),
                        size_trend(row["members"], changes.get(row["id"], {}), today,
                                   row["created_at"].astimezone(UTC).date()))
             for row in rows]
    last = shown[-1] if more else None
    key_of = {"slug": lambda row: None, "percent": lambda row: row.percent, "size": lambda row: row.members}
    return SegmentPage(shown, matching, known, (last.slug, key_of[order](last)) if last else None)


# The commands behind a user's rows of a month: explicit rows by their own command, rollout rows
# by their event's (the report's rows carry neither). Times as the report writes them.
ROW_COMMANDS_SQL = """
SELECT segment_slug, operation, to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS at, command_id
FROM membership_history
WHERE user_id = $1 AND executed_at >= $2 AND executed_at < $3 AND command_id IS NOT NULL
UNION ALL
SELECT segment_slug, NULL, to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), command_id
FROM rollout_events
WHERE executed_at >= $2 AND executed_at < $3 AND segment_slug = ANY($4::text[])
"""


async def user_history(pool: asyncpg.Pool, user_id: int, year: int, month: int, limit: int,
                       ) -> tuple[list[dict[str, str]], bool]:
    """The user's rows of the month's report (the CSV's rows), at most `limit`, each with the
    command behind it (`command_id`, None for an expiry), and whether there were more.
    MonthDropped if retention dropped the month."""
    text = bytearray()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await check_month_kept(conn, year, month)
        async with contextlib.aclosing(stream_report(conn, year, month, user_id, release=_nothing)) as chunks:
            async for chunk in chunks:
                text += chunk
                if text.count(b"\n") > limit + 1:  # the header, `limit` rows and one more
                    break
        lines = text.decode().split("\n")[:limit + 2]
        complete = [line for line in lines[:limit + 1] if line]
        rows = list(csv.DictReader(complete))
        start, end = month_bounds(year, month)
        found = await conn.fetch(ROW_COMMANDS_SQL, user_id, start, end,
                                 sorted({row["segment_slug"] for row in rows if row["source"] == "auto"}))
    explicit: dict[tuple, list[str]] = {}
    for command in found:
        explicit.setdefault((command["segment_slug"], command["operation"], command["at"]), []).append(
            command["command_id"])
    for row in rows:
        ids = explicit.get((row["segment_slug"], None if row["source"] == "auto" else row["operation"],
                            row["executed_at"]), [])
        row["command_id"] = ids.pop(0) if len(ids) > 1 else (ids[0] if ids else None)
    return rows, len(lines) == limit + 2 and bool(lines[-1])


async def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class ImportProgress:
    total: int  # rows published
    counts: Counter  # outcome status -> rows
    problems: list[asyncpg.Record]  # the first rows not applied (line, command_id, status, error), once all are in

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> bool:
        return self.processed >= self.total


IMPORT_OUTCOMES_SQL = """
SELECT status, count(DISTINCT command_id) AS n FROM command_outcomes WHERE command_id = ANY($1::text[]) GROUP BY status
"""


# The rows not applied, lowest line first (the line of each command id comes with it).
IMPORT_PROBLEMS_SQL = """
SELECT i.line, i.command_id, o.status, o.error
FROM unnest($1::text[], $2::int[]) AS i(command_id, line)
CROSS JOIN LATERAL (SELECT status, error FROM command_outcomes
                    WHERE command_id = i.command_id AND status <> 'applied' LIMIT 1) AS o
ORDER BY i.line LIMIT $3
"""


async def import_progress(pool: asyncpg.Pool, job: ImportJob, problems_shown: int) -> ImportProgress:
    command_ids = job.command_ids
    rows = await pool.fetch(IMPORT_OUTCOMES_SQL, command_ids)
    counts = Counter({row["status"]: row["n"] for row in rows})
    done = sum(counts.values()) >= len(command_ids)
    problems = await pool.fetch(IMPORT_PROBLEMS_SQL, command_ids, job.lines, problems_shown) if done and (
        counts["rejected"] or counts["invalid"]) else []
    return ImportProgress(len(command_ids), counts, problems)


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """What a command's Kafka record says beyond its outcome, while it is still on the topic."""

    trace_id: str | None = None
    user_id: int | None = None  # the user a user command was about
    segments: tuple[str, ...] = ()  # the segments it named


def about(command: object) -> tuple[int | None, tuple[str, ...]]:
    """The user and the segments a command (its JSON, valid or not) names."""
    if not isinstance(command, dict):
        return None, ()
    user_id = command.get("user_id")
    user = user_id if isinstance(user_id, int) and not isinstance(user_id, bool) and user_id > 0 else None
    named = [command.get("slug")] + [slug for key in ("add", "remove") if isinstance(command.get(key), list)
                                     for slug in command[key]]
    return user, tuple(dict.fromkeys(slug for slug in named if isinstance(slug, str) and slug))


async def command_record(kafka: KafkaSettings, topic: str, partition: int, offset: int,
                         timeout: float = 3.0) -> CommandRecord:
    """The trace id in the `traceparent` header of the record at topic/partition/offset, and the
    user and segments its command names, if the record is still on the topic."""
    consumer = AIOKafkaConsumer(**kafka_options(kafka), enable_auto_commit=False, fetch_max_wait_ms=100,
                                request_timeout_ms=int(timeout * 1000) + 1000)
    try:
        await asyncio.wait_for(start_client(consumer, kafka), timeout)
        where = TopicPartition(topic, partition)
        consumer.assign([where])
        consumer.seek(where, offset)
        found = await consumer.getmany(where, timeout_ms=int(timeout * 1000), max_records=1)
    except (TimeoutError, KafkaError, OSError):
        return CommandRecord()
    finally:
        await consumer.stop()
    for record in found.get(where, ()):
        if record.offset != offset:
            continue
        trace_id = None
        for name, value in record.headers or ():
            if name == "traceparent":
                parts = value.decode(errors="replace").split("-")
                if len(parts) == 4 and len(parts[1]) == 32:
                    trace_id = parts[1]
        try:
            command = orjson.loads(record.value) if record.value else None
        except orjson.JSONDecodeError:
            command = None
        return CommandRecord(trace_id, *about(command))
    return CommandRecord()
