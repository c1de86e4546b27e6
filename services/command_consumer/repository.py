"""Every SQL statement of the write path. Set-based: a batch costs a handful of round trips."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from shared.membership import HISTORY_COLUMNS, HistoryRow, Segment, UserChanges, UserState
from shared.outcomes import OUTCOME_COLUMNS, OUTCOME_SELECT, OutcomeRow


async def fetch_outcomes(conn: asyncpg.Connection, command_ids: list[str]) -> dict[str, OutcomeRow]:
    rows = await conn.fetch(f"{OUTCOME_SELECT} WHERE command_id = ANY($1::text[])", command_ids)
    return {row["command_id"]: OutcomeRow.from_record(row) for row in rows}


async def insert_outcomes(conn: asyncpg.Connection, outcomes: list[OutcomeRow]) -> None:
    # COPY, not INSERT … ON CONFLICT: a concurrent writer of the same command id (a zombie consumer
    # after a rebalance) makes this transaction fail and retry, and the retry finds the stored outcome.
    await conn.copy_records_to_table("command_outcomes", records=outcomes, columns=OUTCOME_COLUMNS)


async def insert_history(conn: asyncpg.Connection, rows: list[HistoryRow]) -> None:
    if rows:
        await conn.copy_records_to_table("membership_history", columns=HISTORY_COLUMNS, records=rows)


async def lock_live_segments(conn: asyncpg.Connection, slugs: list[str]) -> dict[str, Segment]:
    """Live segments by slug, share-locked so a concurrent delete waits for this batch."""
    if not slugs:
        return {}
    rows = await conn.fetch(
        """SELECT id, slug, percent FROM segments
           WHERE slug = ANY($1::text[]) AND deleted_at IS NULL ORDER BY id FOR SHARE""",
        slugs,
    )
    return {row["slug"]: Segment(row["id"], row["slug"], row["percent"]) for row in rows}


async def load_user_states(conn: asyncpg.Connection, user_ids: list[int],
                           pairs: list[tuple[int, int]]) -> dict[int, UserState]:
    """The registration of the batch's users, and their memberships and exclusions for the
    (user, segment) pairs its commands name, row-locked: the expiry worker skips locked rows, so it
    cannot remove a membership this batch is deciding about."""
    states = {user_id: UserState(user_id) for user_id in user_ids}
    for row in await conn.fetch("SELECT user_id FROM users WHERE user_id = ANY($1::bigint[])", user_ids):
        states[row["user_id"]].registered = True
    if not pairs:
        return states
    pair_users, pair_segments = map(list, zip(*pairs, strict=True))
    for kind, user_id, segment_id, expires_at in await conn.fetch(
        """WITH locked AS (
               SELECT m.user_id, m.segment_id, m.expires_at
               FROM memberships m JOIN unnest($1::bigint[], $2::bigint[]) AS p(user_id, segment_id)
                    ON m.user_id = p.user_id AND m.segment_id = p.segment_id
               FOR UPDATE OF m)
           SELECT 'm', user_id, segment_id, expires_at FROM locked
           UNION ALL
           SELECT 'x', x.user_id, x.segment_id, NULL
           FROM rollout_exclusions x JOIN unnest($1::bigint[], $2::bigint[]) AS p(user_id, segment_id)
                ON x.user_id = p.user_id AND x.segment_id = p.segment_id""",
        pair_users, pair_segments,
    ):
        if kind == "m":
            states[user_id].explicit[segment_id] = expires_at
        else:
            states[user_id].excluded.add(segment_id)
    return states


async def save_user_states(conn: asyncpg.Connection, states: list[UserState], now: datetime) -> None:
    new_users = [s.user_id for s in states if s.newly_registered]
    changes = UserChanges()
    for state in states:
        state.changes(into=changes)
    upserts, deletions = changes.upserts, changes.deletions
    new_exclusions, lifted_exclusions = changes.new_exclusions, changes.lifted_exclusions
    if new_users:
        await conn.execute(
            """INSERT INTO users (user_id, registered_at) SELECT u, $2 FROM unnest($1::bigint[]) AS u
               ON CONFLICT (user_id) DO NOTHING""",
            new_users, now,
        )
    if deletions:
        await conn.execute(
            """DELETE FROM memberships m USING unnest($1::bigint[], $2::bigint[]) AS d(user_id, segment_id)
               WHERE m.user_id = d.user_id AND m.segment_id = d.segment_id""",
            *map(list, zip(*deletions, strict=False)),
        )
    if upserts:
        await conn.execute(
            """INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
               SELECT u, s, $4, e FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS t(u, s, e)
               ON CONFLICT (user_id, segment_id) DO UPDATE SET expires_at = EXCLUDED.expires_at,
                                                               added_at = EXCLUDED.added_at""",
            *map(list, zip(*upserts, strict=False)), now,
        )
    if lifted_exclusions:
        await conn.execute(
            """DELETE FROM rollout_exclusions x
               USING unnest($1::bigint[], $2::bigint[]) AS d(user_id, segment_id)
               WHERE x.user_id = d.user_id AND x.segment_id = d.segment_id""",
            *map(list, zip(*lifted_exclusions, strict=False)),
        )
    if new_exclusions:
        await conn.execute(
            """INSERT INTO rollout_exclusions (user_id, segment_id, excluded_at)
               SELECT u, s, $3 FROM unnest($1::bigint[], $2::bigint[]) AS t(u, s)
               ON CONFLICT DO NOTHING""",
            *map(list, zip(*new_exclusions, strict=False)), now,
        )


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
    """A percent change of a segment, with the users it does not move (explicit members and
    excluded users), so reports can expand it per user exactly without a row per covered user."""
    event_id = await conn.fetchval(
        """INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason,
                                       executed_at, command_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
        segment_id, slug, old, new, reason, now, command_id,
    )
    await conn.execute(
        """INSERT INTO rollout_event_overrides (event_id, user_id)
           SELECT $1::bigint, user_id FROM memberships
           WHERE segment_id = $2 AND (expires_at IS NULL OR expires_at > $3)
           UNION
           SELECT $1::bigint, user_id FROM rollout_exclusions WHERE segment_id = $2""",
        event_id, segment_id, now,
    )


async def delete_segment(conn: asyncpg.Connection, segment_id: int, slug: str, now: datetime,
                         command_id: str) -> int:
    """Mark deleted and remove it from every user with history; returns explicit members removed.

    A membership already past its expiry left at that time (reason ttl), not now.
    """
    await conn.execute("UPDATE segments SET deleted_at = $2, updated_at = $2 WHERE id = $1", segment_id, now)
    await conn.execute("DELETE FROM rollout_exclusions WHERE segment_id = $1", segment_id)
    status = await conn.execute(
        """WITH gone AS (DELETE FROM memberships WHERE segment_id = $1 RETURNING user_id, expires_at)
           INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason, command_id)
           SELECT user_id, $2, 'D',
                  CASE WHEN expires_at <= $3 THEN expires_at ELSE $3 END,
                  'manual',
                  CASE WHEN expires_at <= $3 THEN 'ttl' ELSE 'segment_deleted' END,
                  CASE WHEN expires_at <= $3 THEN NULL ELSE $4 END
           FROM gone""",
        segment_id, slug, now, command_id,
    )
    return int(status.split()[-1])
