"""The read side: plain SQL against the tables the command consumer writes."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from services.query_api.rollout_cache import RolloutSegment
from shared.outcomes import format_timestamp
from shared.rollout import rollout_bucket

# Explicit memberships not yet expired (never relying on the expiry worker having run),
# plus this user's rollout exclusions, in one round trip.
USER_SEGMENTS_SQL = """
SELECT s.slug, m.expires_at, false AS excluded
FROM memberships m JOIN segments s ON s.id = m.segment_id
WHERE m.user_id = $1 AND s.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
UNION ALL
SELECT s.slug, NULL, true
FROM rollout_exclusions x JOIN segments s ON s.id = x.segment_id
WHERE x.user_id = $1 AND s.deleted_at IS NULL
"""


async def user_segments(pool: asyncpg.Pool, rollout: tuple[RolloutSegment, ...], user_id: int) -> list[dict]:
    rows = await pool.fetch(USER_SEGMENTS_SQL, user_id)
    segments: dict[str, dict[str, Any]] = {}
    excluded = set()
    for slug, expires_at, is_exclusion in rows:
        if is_exclusion:
            excluded.add(slug)
        else:
            segments[slug] = {"slug": slug, "source": "manual",
                              "expires_at": format_timestamp(expires_at) if expires_at else None}
    for segment in rollout:  # one hash per live rollout segment, no query
        slug = segment.slug
        if slug not in segments and slug not in excluded and rollout_bucket(slug, user_id) < segment.threshold:
            segments[slug] = {"slug": slug, "source": "auto", "expires_at": None}
    return [segments[slug] for slug in sorted(segments)]


async def user_segments_json(pool: asyncpg.Pool, rollout: tuple[RolloutSegment, ...], user_id: int) -> bytes:
    """The body of GET /users/{user_id}/segments."""
    return orjson.dumps({"user_id": user_id, "segments": await user_segments(pool, rollout, user_id)})


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


async def command_outcome(pool: asyncpg.Pool, command_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        """SELECT command_id, type, status, error, result, processed_at,
                  source_topic, source_partition, source_offset
           FROM command_outcomes WHERE command_id = $1""",
        command_id,
    )
