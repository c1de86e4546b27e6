"""The read side: plain SQL against the tables the command consumer writes."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from services.query_api.batched_lookup import Found, LookupConnection
from services.query_api.rollout_cache import RolloutCache
from shared.db import create_pool
from shared.membership import UserSegment, unexpired, user_segments
from shared.outcomes import OUTCOME_COLUMNS, OutcomeRow, format_timestamp

# Explicit memberships not yet expired (never relying on the expiry worker having run), plus the
# rollout exclusions, of a batch of users in one round trip. LATERAL keeps the plan of a single
# user's lookup (index scans by user id) for each user of the batch. The last row (no user) is the
# segment catalogue's version in the same snapshot: a worker whose rollout list is older reloads
# it before answering (read-your-writes for segment commands, without a second round trip).
USER_SEGMENTS_SQL = f"""
SELECT u.user_id, r.slug, r.expires_at, r.excluded, NULL::bigint
FROM unnest($1::bigint[]) AS u(user_id)
CROSS JOIN LATERAL (
    SELECT s.slug, m.expires_at, false AS excluded
    FROM memberships m JOIN segments s ON s.id = m.segment_id
    WHERE m.user_id = u.user_id AND s.deleted_at IS NULL AND {unexpired("m")}
    UNION ALL
    SELECT s.slug, NULL, true
    FROM rollout_exclusions x JOIN segments s ON s.id = x.segment_id
    WHERE x.user_id = u.user_id AND s.deleted_at IS NULL
) AS r
UNION ALL
SELECT NULL, NULL, NULL, NULL, version FROM segment_catalogue
"""

# The lookup's connections plan the query once: with the batch as a parameter PostgreSQL would
# otherwise keep making a custom plan for every execution (each batch's length changes its cost).
READ_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


async def create_lookup_pool(database_url: str, size: int, *, exit_on_failure: bool = True) -> asyncpg.Pool:
    """The connections of GET /users/{id}/segments's BatchedLookup on one server: `size` of them,
    always open, each with the query prepared as it opens and planned once, with no session reset
    (the lookup changes no session state) and no tracing wrapper (LookupConnection)."""
    return await create_pool(database_url, min_size=size, max_size=size, reset_sessions=False,
                             server_settings=READ_SERVER_SETTINGS, exit_on_failure=exit_on_failure,
                             connection_class=LookupConnection, prepare=(USER_SEGMENTS_SQL,))


async def user_segments_json(found: Found, rollout: RolloutCache, user_id: int) -> bytes:
    """The body of GET /users/{user_id}/segments (see user_segments_list)."""
    segments = [{"slug": slug, "source": source, "expires_at": format_timestamp(expires_at) if expires_at else None}
                for slug, source, expires_at in await user_segments_list(found, rollout, user_id)]
    return orjson.dumps({"user_id": user_id, "segments": segments})


async def user_segments_list(found: Found, rollout: RolloutCache, user_id: int) -> list[UserSegment]:
    """The user's segments from its unexpired explicit memberships and exclusions (USER_SEGMENTS_SQL's
    rows) and the rollout's coverage from the in-memory segments, as new as the catalogue that
    query saw."""
    explicit, excluded = {}, set()
    for slug, expires_at, is_exclusion, _ in found.rows:
        if is_exclusion:
            excluded.add(slug)
        else:
            explicit[slug] = expires_at
    seen_version = found.shared[0][-1]
    if seen_version > rollout.version:
        await rollout.refresh(at_least=seen_version)
    return user_segments(user_id, explicit, excluded, rollout.segments)


async def user(pool: asyncpg.Pool, user_id: int) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT user_id, registered_at FROM users WHERE user_id = $1", user_id)


SEGMENT_COLUMNS = "slug, percent, description, created_at"


def segment_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"slug": row["slug"], "percent": float(row["percent"]), "description": row["description"],
            "created_at": format_timestamp(row["created_at"])}


async def live_segments(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE deleted_at IS NULL ORDER BY slug")
    return [segment_view(row) for row in rows]


async def live_segment(pool: asyncpg.Pool, slug: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE deleted_at IS NULL AND slug = $1", slug)
    return segment_view(row) if row else None


async def command_outcome(pool: asyncpg.Pool, command_id: str) -> tuple[OutcomeRow, str] | None:
    """The stored outcome, and the primary's WAL position now as its consistency token: the
    outcome is visible, so its commit is at or before that position."""
    row = await pool.fetchrow(
        f"SELECT {', '.join(OUTCOME_COLUMNS)}, pg_current_wal_lsn()::text AS token FROM command_outcomes "
        "WHERE command_id = $1 ORDER BY recorded_at DESC LIMIT 1", command_id)
    return (OutcomeRow.from_record(row), row["token"]) if row else None
