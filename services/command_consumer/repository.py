"""Every SQL statement of the write path. Set-based: a batch of user commands is three statements
between BEGIN and COMMIT (the inbox look-up, the state its commands decide on, every write), or
two COPYs more when it is large."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from shared.db import create_pool
from shared.membership import HISTORY_COLUMNS, HistoryRow, Segment, UserChanges, UserState
from shared.outcomes import OUTCOME_COLUMNS, OUTCOME_SELECT, OutcomeRow
from shared.settings import DatabaseSettings

_FETCH_OUTCOMES = f"{OUTCOME_SELECT} WHERE command_id = ANY($1::text[])"


async def fetch_outcomes(conn: asyncpg.Connection, command_ids: list[str]) -> dict[str, OutcomeRow]:
    rows = await conn.fetch(_FETCH_OUTCOMES, command_ids)
    return {row["command_id"]: OutcomeRow.from_record(row) for row in rows}


_LOAD_STATE = """WITH live AS MATERIALIZED (
           SELECT id, slug, percent FROM segments
           WHERE slug = ANY($1::text[]) AND deleted_at IS NULL ORDER BY id FOR SHARE),
       pairs AS MATERIALIZED (
           SELECT p.user_id, live.id AS segment_id
           FROM unnest($3::bigint[], $4::text[]) AS p(user_id, slug) JOIN live ON live.slug = p.slug),
       locked AS (
           SELECT m.user_id, m.segment_id, m.expires_at, m.added_at
           FROM memberships m JOIN pairs p ON m.user_id = p.user_id AND m.segment_id = p.segment_id
           FOR UPDATE OF m)
       SELECT 's' AS kind, NULL::bigint AS user_id, id AS segment_id, slug, percent,
              NULL::timestamptz AS expires_at, NULL::timestamptz AS since FROM live
       UNION ALL
       SELECT 'u', user_id, NULL, NULL, NULL, NULL, NULL FROM users WHERE user_id = ANY($2::bigint[])
       UNION ALL
       SELECT 'm', user_id, segment_id, NULL, NULL, expires_at, added_at FROM locked
       UNION ALL
       SELECT 'x', x.user_id, x.segment_id, NULL, NULL, NULL, x.excluded_at
       FROM rollout_exclusions x JOIN pairs p ON x.user_id = p.user_id AND x.segment_id = p.segment_id"""


async def load_batch_state(conn: asyncpg.Connection, user_ids: list[int],
                           pairs: list[tuple[int, str]]) -> tuple[dict[str, Segment], dict[int, UserState]]:
    """In one round trip: the live segments the batch names, by slug, share-locked so that a
    concurrent delete waits for this batch (taken first, in id order); the registration of the
    batch's users; and their memberships and exclusions for the (user, segment slug) `pairs` its
    commands name, the memberships row-locked: the expiry worker skips locked rows, so it cannot
    remove a membership this batch is deciding about."""
    states = {user_id: UserState(user_id) for user_id in user_ids}
    segments: dict[str, Segment] = {}
    pair_users, pair_slugs = (list(column) for column in zip(*pairs, strict=True)) if pairs else ([], [])
    rows = await conn.fetch(_LOAD_STATE, sorted(set(pair_slugs)), user_ids, pair_users, pair_slugs)
    for kind, user_id, segment_id, slug, percent, expires_at, since in rows:
        if kind == "s":
            segments[slug] = Segment(segment_id, slug, percent)
        elif kind == "u":
            states[user_id].registered = True
        elif kind == "m":
            states[user_id].load_explicit(segment_id, expires_at, since)
        else:
            states[user_id].load_exclusion(segment_id, since)
    return segments, states


# A batch's rows go in its one statement while they are few (light load, where each round trip
# saved is latency saved); past that, its history and inbox rows go by COPY, which is faster.
ONE_STATEMENT_ROWS = 100


async def write_batch(conn: asyncpg.Connection, states: list[UserState], history: list[HistoryRow],
                      outcomes: list[OutcomeRow], now: datetime) -> None:
    """A batch's changes: new users, memberships and exclusions changed, history rows and new
    outcomes, and the spans of explicit rows that ended (UserState.changes) where the segment had
    a rollout event since they started, in one statement (or, for many rows, one and two COPYs),
    `now` being when they are written. The outcomes are plain
    inserts, not INSERT … ON CONFLICT: a concurrent writer of the same command id (a zombie
    consumer after a rebalance) makes this transaction fail and retry, and the retry finds the
    stored outcome."""
    if not (states or history or outcomes):
        return
    new_users = [s.user_id for s in states if s.newly_registered]
    changes = UserChanges()
    for state in states:
        state.changes(now, into=changes)
    copied = len(history) > ONE_STATEMENT_ROWS or len(outcomes) > ONE_STATEMENT_ROWS
    await conn.execute(_WRITE_BATCH, new_users, now, *_columns(changes.deletions, 2), *_columns(changes.upserts, 3),
                       *_columns(changes.lifted_exclusions, 2), *_columns(changes.new_exclusions, 2),
                       *_columns([] if copied else history, len(HISTORY_COLUMNS)),
                       *_columns([] if copied else outcomes, len(OUTCOME_COLUMNS)),
                       *_columns(changes.ended_spans, 4))
    if copied:
        if history:
            await conn.copy_records_to_table("membership_history", columns=HISTORY_COLUMNS, records=history)
        if outcomes:
            await conn.copy_records_to_table("command_outcomes", records=outcomes, columns=OUTCOME_COLUMNS)


def _columns(rows: list[tuple], width: int) -> list[list]:
    """Rows as `width` column lists (for unnest)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


# Data-modifying CTEs, each on rows of its own (a changed pair is either upserted or deleted, an
# exclusion either new or lifted), so their order within the statement does not matter.
_WRITE_BATCH = f"""
WITH new_users AS (
    INSERT INTO users (user_id, registered_at) SELECT u, $2 FROM unnest($1::bigint[]) AS u
    ON CONFLICT (user_id) DO NOTHING),
deleted AS (
    DELETE FROM memberships m USING unnest($3::bigint[], $4::bigint[]) AS d(user_id, segment_id)
    WHERE m.user_id = d.user_id AND m.segment_id = d.segment_id),
upserted AS (
    INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
    SELECT u, s, $2, e FROM unnest($5::bigint[], $6::bigint[], $7::timestamptz[]) AS t(u, s, e)
    ON CONFLICT (user_id, segment_id) DO UPDATE SET expires_at = EXCLUDED.expires_at, added_at = EXCLUDED.added_at),
lifted AS (
    DELETE FROM rollout_exclusions x USING unnest($8::bigint[], $9::bigint[]) AS d(user_id, segment_id)
    WHERE x.user_id = d.user_id AND x.segment_id = d.segment_id),
excluded AS (
    INSERT INTO rollout_exclusions (user_id, segment_id, excluded_at)
    SELECT u, s, $2 FROM unnest($10::bigint[], $11::bigint[]) AS t(u, s)
    ON CONFLICT DO NOTHING),
spans AS (
    INSERT INTO explicit_spans (segment_id, user_id, since, ended)
    SELECT t.s, t.u, t.since, t.ended
    FROM unnest($33::bigint[], $34::bigint[], $35::timestamptz[], $36::timestamptz[]) AS t(u, s, since, ended)
    JOIN segments g ON g.id = t.s
    WHERE g.rolled_at >= t.since),
history AS (
    INSERT INTO membership_history ({', '.join(HISTORY_COLUMNS)})
    SELECT * FROM unnest($12::bigint[], $13::text[], $14::text[], $15::timestamptz[], $16::text[], $17::text[],
                         $18::text[], $19::timestamptz[]))
INSERT INTO command_outcomes ({', '.join(OUTCOME_COLUMNS)})
SELECT * FROM unnest($20::text[], $21::text[], $22::text[], $23::jsonb[], $24::jsonb[], $25::timestamptz[],
                     $26::text[], $27::integer[], $28::bigint[], $29::text[], $30::timestamptz[], $31::bigint[],
                     $32::text[])
"""

# What a batch of user commands sends: each connection prepares them as the pool opens it.
WRITE_PATH_STATEMENTS = (_FETCH_OUTCOMES, _LOAD_STATE, _WRITE_BATCH)


async def open_pool(database: DatabaseSettings, partitions: int) -> asyncpg.Pool:
    """The consumer's connections, every one opened and prepared at startup: one for each of the
    `partitions` whose batch may be in a transaction at once, and two to spare. A connection opened
    in a batch's path would cost that batch its connect, its type look-ups (the jsonb array of the
    write statement) and a cold backend's catalog reads (bench/consumer_latency.py shows the tail it
    makes). All of them stay open while the consumer runs (none is above the pool's minimum, so none
    is closed for being idle). The consumer never changes session state: connections go back to
    the pool without a reset round trip."""
    size = max(database.db_pool_max_size, partitions + 2)
    return await create_pool(database.require_database_url(), min_size=size, max_size=size, reset_sessions=False,
                             prepare=WRITE_PATH_STATEMENTS)


# Segment commands are few; each is a short sequence of statements in the batch transaction.

async def bump_catalogue_version(conn: asyncpg.Connection) -> None:
    """Readers compare this with the version of their in-memory rollout list (migration 0004).
    A row, not a sequence: a sequence would show the new version before the change commits."""
    await conn.execute("UPDATE segment_catalogue SET version = version + 1")


async def find_live_segment(conn: asyncpg.Connection, slug: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, slug, percent, description FROM segments WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE",
        slug,
    )


async def insert_segment(conn: asyncpg.Connection, slug: str, percent: Decimal, description: str | None,
                         now: datetime) -> int:
    return await conn.fetchval(
        """INSERT INTO segments (slug, percent, description, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $4) RETURNING id""",
        slug, percent, description, now,
    )


async def update_segment(conn: asyncpg.Connection, segment_id: int, percent: Decimal, description: str | None,
                         now: datetime) -> None:
    await conn.execute(
        "UPDATE segments SET percent = $2, description = $3, updated_at = $4 WHERE id = $1",
        segment_id, percent, description, now,
    )


async def record_rollout_event(conn: asyncpg.Connection, segment_id: int, slug: str, old: Decimal, new: Decimal,
                               reason: str, now: datetime, command_id: str) -> None:
    """A percent change of a segment: two rows, whatever the segment's size. Whom it did not move
    (the users holding an explicit membership or an exclusion at `now`) reports find from the
    explicit rows' starts and the spans of those that ended since (explicit_spans), which every
    writer keeps for a segment whose `rolled_at` is at or after a row's start."""
    await conn.execute(
        """WITH event AS (
               INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason,
                                           executed_at, command_id, overrides_kept)
               VALUES ($1, $2, $3, $4, $5, $6, $7, false))
           UPDATE segments SET rolled_at = $6 WHERE id = $1""",
        segment_id, slug, old, new, reason, now, command_id,
    )


async def mark_deleted(conn: asyncpg.Connection, segment_id: int, now: datetime) -> None:
    """The segment is deleted from `now` on: reads and commands no longer see it, its exclusions
    go (each kept as a span that includes the deletion's own event); its explicit members are
    removed by remove_members (at once or in chunks)."""
    await conn.execute("UPDATE segments SET deleted_at = $2, updated_at = $2 WHERE id = $1", segment_id, now)
    await conn.execute(
        f"""WITH gone AS (DELETE FROM rollout_exclusions WHERE segment_id = $1 RETURNING user_id, excluded_at)
           INSERT INTO explicit_spans (segment_id, user_id, since, ended)
           SELECT $1, user_id, excluded_at, {_JUST_AFTER.format("$2")} FROM gone
           WHERE excluded_at <= (SELECT rolled_at FROM segments WHERE id = $1)""",
        segment_id, now)


async def members_beyond(conn: asyncpg.Connection, segment_id: int, limit: int) -> bool:
    """Whether the segment has more than `limit` explicit members (reads at most limit + 1)."""
    return await conn.fetchval("SELECT count(*) > $2 FROM (SELECT 1 FROM memberships WHERE segment_id = $1 "
                               "LIMIT $2 + 1) AS first_rows", segment_id, limit)


# A span ended by a segment's deletion at {} covers the deletion's own rollout event: it ends
# at the first moment after it (timestamps count microseconds).
_JUST_AFTER = "{}::timestamptz + interval '1 microsecond'"
# The history of the rows in `gone`: each left at the deletion ($3, by command $4), or at its
# expiry if that came first. And the spans of those that started at or before the segment's last
# rollout event.
_HISTORY_OF_GONE = """
INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason, command_id,
                                expires_at)
SELECT user_id, $2, 'D',
       CASE WHEN expires_at <= $3 THEN expires_at ELSE $3 END,
       'manual',
       CASE WHEN expires_at <= $3 THEN 'ttl' ELSE 'segment_deleted' END,
       CASE WHEN expires_at <= $3 THEN NULL ELSE $4 END,
       expires_at
FROM gone"""
_SPANS_OF_GONE = f"""
INSERT INTO explicit_spans (segment_id, user_id, since, ended)
SELECT $1, user_id, added_at, CASE WHEN expires_at <= $3 THEN expires_at ELSE {_JUST_AFTER.format("$3")} END
FROM gone
WHERE added_at <= (SELECT rolled_at FROM segments WHERE id = $1)"""
_REMOVE_MEMBERS = f"""
WITH gone AS (
    DELETE FROM memberships WHERE segment_id = $1
    RETURNING user_id, added_at, expires_at),
spans AS ({_SPANS_OF_GONE})
{_HISTORY_OF_GONE}"""
# A chunk: the segment's next rows in the order of its index (memberships_segment_recent), from
# where the previous chunk ended ($6, $7; NULL for the first), so that no chunk steps over the
# index entries the chunks before it left dead. No row joins a deleted
# segment, so none is missed. Returns where the next chunk starts.
_REMOVE_CHUNK = f"""
WITH chunk AS (
    SELECT user_id, added_at FROM memberships
    WHERE segment_id = $1 AND ($6::timestamptz IS NULL OR (added_at, user_id) < ($6, $7))
    ORDER BY added_at DESC, user_id DESC LIMIT $5),
gone AS (
    DELETE FROM memberships m USING chunk
    WHERE m.segment_id = $1 AND m.user_id = chunk.user_id
    RETURNING m.user_id, m.added_at, m.expires_at),
spans AS ({_SPANS_OF_GONE}),
written AS ({_HISTORY_OF_GONE})
SELECT (SELECT count(*) FROM gone) AS removed, count(*) AS seen,
       (array_agg(added_at ORDER BY added_at, user_id))[1] AS last_added_at,
       (array_agg(user_id ORDER BY added_at, user_id))[1] AS last_user_id
FROM chunk"""


async def remove_members(conn: asyncpg.Connection, segment_id: int, slug: str, deleted_at: datetime,
                         command_id: str) -> int:
    """Remove a deleted segment's explicit members, each with its history row: left at the
    deletion (reason segment_deleted), or at its expiry if that came first (reason ttl). Returns
    how many were removed."""
    status = await conn.execute(_REMOVE_MEMBERS, segment_id, slug, deleted_at, command_id)
    return int(status.split()[-1])


async def remove_chunk(conn: asyncpg.Connection, segment_id: int, slug: str, deleted_at: datetime, command_id: str,
                       limit: int, after: tuple[datetime, int] | None) -> tuple[int, bool, tuple[datetime, int] | None]:
    """remove_members for at most `limit` members, the next after `after` in the segment's index
    order; returns how many, whether there may be more, and where the next chunk starts."""
    row = await conn.fetchrow(_REMOVE_CHUNK, segment_id, slug, deleted_at, command_id, limit,
                              *(after or (None, None)))
    last = (row["last_added_at"], row["last_user_id"]) if row["seen"] else after
    return row["removed"], row["seen"] == limit, last


async def queue_removal(conn: asyncpg.Connection, draft: OutcomeRow, segment_id: int, slug: str,
                        deleted_at: datetime, traceparent: bytes | None) -> None:
    """A deleted segment's members to remove in chunks (segment_removals), with what its outcome
    will say besides the result."""
    await conn.execute(
        "INSERT INTO segment_removals (command_id, segment_id, slug, deleted_at, traceparent, outcome) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        draft.command_id, segment_id, slug, deleted_at, traceparent,
        {name: value.isoformat() if isinstance(value, datetime) else value for name, value in draft._asdict().items()})


async def pending_removals(conn: asyncpg.Connection, command_ids: list[str]) -> set[str]:
    """Those of these commands whose members are still being removed (no outcome yet)."""
    rows = await conn.fetch("SELECT command_id FROM segment_removals WHERE command_id = ANY($1::text[]) "
                            "AND done_at IS NULL", command_ids)
    return {row["command_id"] for row in rows}
