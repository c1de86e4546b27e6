"""The read side: plain SQL against the tables the command consumer writes."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import orjson

from services.query_api.rollout_cache import RolloutSegment
from shared.outcomes import format_timestamp
from shared.rollout import rollout_bucket

# Explicit memberships not yet expired (never relying on the expiry worker having run), plus the
# rollout exclusions, of a batch of users in one round trip. LATERAL keeps the plan of a single
# user's lookup (index scans by user id) for each user of the batch.
USER_SEGMENTS_SQL = """
SELECT u.user_id, r.slug, r.expires_at, r.excluded
FROM unnest($1::bigint[]) AS u(user_id)
CROSS JOIN LATERAL (
    SELECT s.slug, m.expires_at, false AS excluded
    FROM memberships m JOIN segments s ON s.id = m.segment_id
    WHERE m.user_id = u.user_id AND s.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
    UNION ALL
    SELECT s.slug, NULL, true
    FROM rollout_exclusions x JOIN segments s ON s.id = x.segment_id
    WHERE x.user_id = u.user_id AND s.deleted_at IS NULL
) AS r
"""

# The reader's connections plan the query once: with the batch as a parameter PostgreSQL would
# otherwise keep making a custom plan for every execution (each batch's length changes its cost).
READ_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


class MembershipReader:
    """Reads explicit memberships and exclusions, one query for all the requests waiting together.

    At most `max_in_flight` queries run at once (by default one per connection of its pool). Reads
    asked for meanwhile wait together, and the next query, sent as soon as a connection is free
    (or at the end of the event-loop iteration when one already is), answers all of them: under
    load one round trip serves many requests and nothing queues for a connection. A query only
    ever answers reads asked for before it was sent, so no answer is older than its request:
    freshness is that of a query per request.
    """

    def __init__(self, pool: asyncpg.Pool, max_in_flight: int | None = None, max_batch: int = 100) -> None:
        self._pool = pool
        self._max_in_flight = max_in_flight or pool.get_max_size()
        self._max_batch = max_batch
        self._waiting: dict[int, list[asyncio.Future]] = {}
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()

    async def read(self, user_id: int) -> list[tuple[str, Any, bool]]:
        """(slug, expires_at, excluded) rows of one user."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, []).append(future)
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._waiting and not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = {user_id: self._waiting.pop(user_id)
                     for user_id in list(itertools.islice(self._waiting, self._max_batch))}
            self._in_flight += 1
            task = asyncio.create_task(self._query(batch))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _query(self, waiting: dict[int, list[asyncio.Future]]) -> None:
        try:
            await self._answer(waiting)
        finally:
            self._in_flight -= 1
            self._schedule()

    async def _answer(self, waiting: dict[int, list[asyncio.Future]]) -> None:
        try:
            records = await self._pool.fetch(USER_SEGMENTS_SQL, list(waiting))
        except Exception as error:  # each waiting request fails with it (a 500), as its own query would
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            return
        except BaseException:
            for futures in waiting.values():
                for future in futures:
                    future.cancel()
            raise
        rows: dict[int, list[tuple[str, Any, bool]]] = {user_id: [] for user_id in waiting}
        for user_id, slug, expires_at, excluded in records:
            rows[user_id].append((slug, expires_at, excluded))
        for user_id, futures in waiting.items():
            for future in futures:
                if not future.done():  # a request that went away no longer waits
                    future.set_result(rows[user_id])


async def user_segments(reader: MembershipReader, rollout: tuple[RolloutSegment, ...], user_id: int) -> list[dict]:
    segments: dict[str, dict[str, Any]] = {}
    excluded = set()
    for slug, expires_at, is_exclusion in await reader.read(user_id):
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


async def user_segments_json(reader: MembershipReader, rollout: tuple[RolloutSegment, ...], user_id: int) -> bytes:
    """The body of GET /users/{user_id}/segments."""
    return orjson.dumps({"user_id": user_id, "segments": await user_segments(reader, rollout, user_id)})


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
