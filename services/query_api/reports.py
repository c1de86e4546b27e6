"""History reports: signed, expiring, stateless links, and the CSV streamed from server-side cursors.

Explicit entries and exits come from `membership_history`; the rollout's are derived from
`rollout_events` (no row per covered user is stored) and merged in the contract's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import mmh3
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from services.query_api.signing import REPORT_LINKS
from shared.membership import rollout_move
from shared.rollout import BUCKETS, rollout_threshold

CSV_HEADER = "user_id,segment_slug,operation,executed_at,source,reason\n"
CURSOR_PREFETCH = 5000
CHUNK_ROWS = 5000


class ReportLinkExpired(Exception):
    pass


class ReportLinkInvalid(Exception):
    pass


class ReportSigner:
    """Link tokens carry only the report's query, signed with HMAC and timestamped (itsdangerous)."""

    def __init__(self, key: str | bytes, ttl_seconds: int) -> None:
        self._serializer = URLSafeTimedSerializer(key, salt=REPORT_LINKS)
        self.ttl_seconds = ttl_seconds

    def sign(self, year: int, month: int, user_id: int | None) -> str:
        return self._serializer.dumps({"y": year, "m": month, "u": user_id})

    def verify(self, token: str) -> tuple[int, int, int | None]:
        try:
            query = self._serializer.loads(token, max_age=self.ttl_seconds)
        except SignatureExpired as error:
            raise ReportLinkExpired("this report link has expired; ask for a new one") from error
        except BadSignature as error:
            raise ReportLinkInvalid("this report link is not valid (it was altered or signed elsewhere)") from error
        try:
            return int(query["y"]), int(query["m"]), None if query["u"] is None else int(query["u"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReportLinkInvalid("this report link is not valid") from error


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC) if year < 9999 or month < 12 else \
        datetime.max.replace(tzinfo=UTC)
    return start, end


def _format(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


_EXPLICIT_FROM = """
FROM membership_history
WHERE executed_at >= $1 AND executed_at < $2 AND ($3::bigint IS NULL OR user_id = $3)
ORDER BY executed_at, user_id, segment_slug, id
"""
_LINE = """user_id::text || ',' || segment_slug || ',' || operation || ','
       || to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ',' || source || ',' || reason
       || E'\\n'"""
# Explicit rows with their sort keys, for merging with the rollout's rows.
EXPLICIT_SQL = f"SELECT executed_at, user_id, segment_slug, {_LINE} AS line {_EXPLICIT_FROM}"
# The same rows for COPY … CSV, when there is nothing to merge (no field can need quoting: slugs
# exclude commas, quotes and line breaks).
EXPLICIT_COPY_SQL = f"""SELECT user_id, segment_slug, operation,
       to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), source, reason {_EXPLICIT_FROM}"""
COPY_QUEUE_CHUNKS = 16

# Whether user {user} held an explicit membership or an exclusion for event e's segment at the
# event (then it did not move the user): events recorded before migration 0013 kept the list of
# such users (rollout_event_overrides); later ones find them among the rows that held then,
# still stored or kept as spans when they ended (ExplicitSpan).
_HELD_AT_EVENT = """CASE WHEN e.overrides_kept
    THEN EXISTS (SELECT 1 FROM rollout_event_overrides o WHERE o.event_id = e.id AND o.user_id = {user})
    ELSE EXISTS (SELECT 1 FROM memberships m
                 WHERE m.segment_id = e.segment_id AND m.user_id = {user} AND m.added_at <= e.executed_at
                   AND (m.expires_at IS NULL OR m.expires_at > e.executed_at))
      OR EXISTS (SELECT 1 FROM rollout_exclusions x
                 WHERE x.segment_id = e.segment_id AND x.user_id = {user} AND x.excluded_at <= e.executed_at)
      OR EXISTS (SELECT 1 FROM explicit_spans s
                 WHERE s.segment_id = e.segment_id AND s.user_id = {user} AND s.since <= e.executed_at
                   AND s.ended > e.executed_at)
    END"""

# Rollout events of the month; `overridden` is whether the one user asked about (if any) held an
# explicit membership or an exclusion for the segment at that moment.
EVENTS_SQL = f"""
SELECT e.id, e.segment_id, e.segment_slug, e.old_percent, e.new_percent, e.reason, e.executed_at,
       e.overrides_kept, $3::bigint IS NOT NULL AND {_HELD_AT_EVENT.format(user="$3")} AS overridden
FROM rollout_events e
WHERE e.executed_at >= $1 AND e.executed_at < $2
ORDER BY e.executed_at, e.segment_slug
"""

HAS_EVENTS_SQL = "SELECT EXISTS (SELECT 1 FROM rollout_events WHERE executed_at >= $1 AND executed_at < $2)"
EXPLICIT_AT_SQL = "SELECT EXISTS (SELECT 1 FROM membership_history WHERE executed_at = $1)"

# Every registered user an event may have moved, in user_id order, streamed: for an event that
# kept its overrides ($1 its id), and for one at $2 of segment $1 (as anti-joins, not a test per user).
KEPT_EVENT_USERS_SQL = """
SELECT u.user_id FROM users u
WHERE NOT EXISTS (SELECT 1 FROM rollout_event_overrides o WHERE o.event_id = $1 AND o.user_id = u.user_id)
ORDER BY u.user_id
"""
EVENT_USERS_SQL = """
SELECT u.user_id FROM users u
WHERE NOT EXISTS (SELECT 1 FROM memberships m
                  WHERE m.segment_id = $1 AND m.user_id = u.user_id AND m.added_at <= $2
                    AND (m.expires_at IS NULL OR m.expires_at > $2))
  AND NOT EXISTS (SELECT 1 FROM rollout_exclusions x
                  WHERE x.segment_id = $1 AND x.user_id = u.user_id AND x.excluded_at <= $2)
  AND NOT EXISTS (SELECT 1 FROM explicit_spans s
                  WHERE s.segment_id = $1 AND s.user_id = u.user_id AND s.since <= $2 AND s.ended > $2)
ORDER BY u.user_id
"""


def _rollout_line(user_id: int, event: asyncpg.Record, before: int, after: int) -> tuple | None:
    """The user's entry or exit caused by a rollout event whose thresholds went from `before` to
    `after`, as a row to merge; None when the event did not move the user."""
    slug = event["segment_slug"]
    operation = rollout_move(slug, user_id, before, after)
    if operation is None:
        return None
    line = f"{user_id},{slug},{operation},{_format(event['executed_at'])},auto,{event['reason']}\n"
    return (event["executed_at"], user_id, slug, line)


async def _explicit_rows(conn: asyncpg.Connection, start, end, user_id) -> AsyncIterator[tuple]:
    async for row in conn.cursor(EXPLICIT_SQL, start, end, user_id, prefetch=CURSOR_PREFETCH):
        yield tuple(row)


def _thresholds(event: asyncpg.Record) -> tuple[int, int]:
    return rollout_threshold(event["old_percent"]), rollout_threshold(event["new_percent"])


def _event_users(event: asyncpg.Record) -> tuple[str, tuple]:
    """The query (and its arguments) for the registered users an event may have moved."""
    if event["overrides_kept"]:
        return KEPT_EVENT_USERS_SQL, (event["id"],)
    return EVENT_USERS_SQL, (event["segment_id"], event["executed_at"])


async def _user_rollout_rows(conn: asyncpg.Connection, start, end, user_id: int) -> AsyncIterator[tuple]:
    """One user's entries and exits the rollout caused, derived from the month's events."""
    for event in await conn.fetch(EVENTS_SQL, start, end, user_id):
        row = None if event["overridden"] else _rollout_line(user_id, event, *_thresholds(event))
        if row:
            yield row


async def _event_rows(conn: asyncpg.Connection, event: asyncpg.Record) -> AsyncIterator[tuple]:
    """An event's entries and exits for every registered user, as rows to merge."""
    query, args = _event_users(event)
    before, after = _thresholds(event)
    async for user in conn.cursor(query, *args, prefetch=CURSOR_PREFETCH):
        row = _rollout_line(user["user_id"], event, before, after)
        if row:
            yield row


async def _event_lines(conn: asyncpg.Connection, event: asyncpg.Record) -> AsyncIterator[bytes]:
    """An event's entries and exits for every registered user, as CSV: the users' ids arrive from
    COPY as text in user_id order, and each is hashed as it arrived ("<slug>:" + its digits is
    the bucket's key), so no id becomes a Python object unless the event moved it."""
    query, args = _event_users(event)
    slug = event["segment_slug"]
    before, after = _thresholds(event)
    low, high = min(before, after), max(before, after)
    operation = "I" if after > before else "D"
    key = f"{slug}:".encode()
    tail = f",{slug},{operation},{_format(event['executed_at'])},auto,{event['reason']}\n".encode()
    hash_key = mmh3.hash
    rest = b""
    async with contextlib.aclosing(_copy(conn, query, *args)) as chunks:
        async for chunk in chunks:
            ids = (rest + chunk).split(b"\n")
            rest = ids.pop()  # a partial id, completed by the next chunk (or empty)
            lines = [user + tail for user in ids if low <= hash_key(key + user, 0, False) % BUCKETS < high]
            if lines:
                yield b"".join(lines)


async def _all_users_body(conn: asyncpg.Connection, start, end) -> AsyncIterator[bytes]:
    """The month for every user when it has rollout events. Between two events' moments the
    explicit rows are PostgreSQL's own CSV (COPY); at a moment of one event and no explicit row
    the event's rows follow in user order; only a moment shared by several events or by explicit
    rows (a deletion's members leave at its event's time) is merged row by row."""
    events = await conn.fetch(EVENTS_SQL, start, end, None)
    after = start
    for moment, group in itertools.groupby(events, key=lambda event: event["executed_at"]):
        group = list(group)
        async with contextlib.aclosing(_copy(conn, EXPLICIT_COPY_SQL, after, moment, None)) as chunks:
            async for chunk in chunks:
                yield chunk
        after = moment + timedelta(microseconds=1)  # the next moment timestamps can hold
        if len(group) == 1 and not await conn.fetchval(EXPLICIT_AT_SQL, moment):
            async with contextlib.aclosing(_event_lines(conn, group[0])) as chunks:
                async for chunk in chunks:
                    yield chunk
            continue
        merged = _explicit_rows(conn, moment, after, None)
        for event in group:
            merged = _merge(merged, _event_rows(conn, event))
        async with contextlib.aclosing(_in_chunks(merged)) as chunks:
            async for chunk in chunks:
                yield chunk
    async with contextlib.aclosing(_copy(conn, EXPLICIT_COPY_SQL, after, end, None)) as chunks:
        async for chunk in chunks:
            yield chunk


async def _in_chunks(rows: AsyncIterator[tuple]) -> AsyncIterator[bytes]:
    chunk: list[str] = []
    async for row in rows:
        chunk.append(row[3])
        if len(chunk) >= CHUNK_ROWS:
            yield "".join(chunk).encode()
            chunk.clear()
    if chunk:
        yield "".join(chunk).encode()


async def _merge(first: AsyncIterator[tuple], second: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    """Merge two streams sorted by (executed_at, user_id, slug) keeping that order."""
    sentinel = None
    a = await anext(first, sentinel)
    b = await anext(second, sentinel)
    while a is not None or b is not None:
        if b is None or (a is not None and a[:3] <= b[:3]):
            yield a
            a = await anext(first, sentinel)
        else:
            yield b
            b = await anext(second, sentinel)


async def _copy(conn: asyncpg.Connection, query: str, *args) -> AsyncIterator[bytes]:
    """COPY (query) TO STDOUT as CSV, passed on as it arrives. The queue is bounded, so a slow
    client slows the COPY down instead of filling memory.

    When the reader stops early (the client went away), the rest of the COPY is read and dropped
    rather than cancelled: asyncpg can hand the connection back while a cancelled COPY's error is
    still arriving (MagicStack/asyncpg#784), and the next statement on it then fails."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=COPY_QUEUE_CHUNKS)
    dropping = False

    async def forward(data: bytearray) -> None:
        if not dropping:
            await queue.put(bytes(data))  # asyncpg hands over its own buffer

    async def copy() -> None:
        try:
            await conn.copy_from_query(query, *args, output=forward, format="csv")
        finally:
            if not dropping:
                await queue.put(None)

    task = asyncio.create_task(copy())
    try:
        while (chunk := await queue.get()) is not None:
            yield chunk
        await task  # raises what the COPY raised
    finally:
        if not task.done():  # the reader stopped early
            dropping = True
            while not queue.empty():  # frees a put the COPY may be waiting on
                queue.get_nowait()
            await asyncio.gather(task, return_exceptions=True)


HORIZON_SQL = "SELECT dropped_before FROM retention_horizon WHERE table_name = 'membership_history'"


class MonthDropped(Exception):
    """The month's history was dropped by retention (HISTORY_RETENTION_MONTHS)."""


async def check_month_kept(conn: asyncpg.Connection | asyncpg.Pool, year: int, month: int) -> None:
    """MonthDropped if the month lies before what history retention keeps: its report would be
    empty for a reason other than nothing having happened (README: "Data that stays bounded")."""
    start, _ = month_bounds(year, month)
    horizon = await conn.fetchval(HORIZON_SQL)
    if horizon is not None and start < horizon:
        raise MonthDropped(f"the history of {year:04d}-{month:02d} is past retention (HISTORY_RETENTION_MONTHS): "
                           f"months before {horizon:%Y-%m} have been dropped")


async def stream_report(conn: asyncpg.Connection, year: int, month: int, user_id: int | None,
                        release: Callable[[], Awaitable[None]], work_mem: str | None = None) -> AsyncIterator[bytes]:
    """The CSV in chunks from one repeatable-read snapshot, produced as the client reads; `release`
    gives the connection back when it is done (or the client went away). `work_mem`, if given, is
    the transaction's (REPORT_WORK_MEM)."""
    start, end = month_bounds(year, month)
    try:
        yield CSV_HEADER.encode()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if work_mem:
                await conn.execute("SELECT set_config('work_mem', $1, true)", work_mem)
            # Every stream inside is closed in order when the client goes away, so no COPY of
            # the report's is still running on the connection when its transaction ends.
            async with contextlib.aclosing(_report_body(conn, start, end, user_id)) as chunks:
                async for chunk in chunks:
                    yield chunk
    finally:
        await release()


async def _report_body(conn: asyncpg.Connection, start, end, user_id: int | None) -> AsyncIterator[bytes]:
    if not await conn.fetchval(HAS_EVENTS_SQL, start, end):
        async with contextlib.aclosing(_copy(conn, EXPLICIT_COPY_SQL, start, end, user_id)) as chunks:
            async for chunk in chunks:  # nothing to merge
                yield chunk
    elif user_id is None:
        async with contextlib.aclosing(_all_users_body(conn, start, end)) as chunks:
            async for chunk in chunks:
                yield chunk
    else:
        rows = _merge(_explicit_rows(conn, start, end, user_id), _user_rollout_rows(conn, start, end, user_id))
        async with contextlib.aclosing(_in_chunks(rows)) as chunks:
            async for chunk in chunks:
                yield chunk
