"""The live rollout segments, kept in memory, with the catalogue version they were loaded at.

A read costs one hash per rollout segment and no extra query. Every read's own query also returns
the catalogue's version (migration 0004); when it is newer than the list's, the reader reloads the
list first, so a segment command is reflected by every read that starts after its outcome is
stored. A background refresh every `ROLLOUT_CACHE_REFRESH_SECONDS` keeps the list warm and tells
/readyz whether the database answers.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from shared.membership import Segment

log = structlog.get_logger(__name__)

# One statement, so the version and the list come from the same snapshot.
LOAD_SQL = """
SELECT c.version, s.id, s.slug, s.percent
FROM segment_catalogue c
LEFT JOIN segments s ON s.deleted_at IS NULL AND s.percent > 0
ORDER BY s.slug
"""


class RolloutCache:
    def __init__(self, pool: asyncpg.Pool, refresh_seconds: float) -> None:
        self._pool = pool
        self._refresh_seconds = refresh_seconds
        self.segments: tuple[Segment, ...] = ()
        self.version = -1  # of the segment catalogue the list was loaded at
        self._loading: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.healthy = False

    async def refresh(self, at_least: int | None = None) -> None:
        """Load the list (sharing a load already under way); with `at_least`, until its version
        is at least that: a load under way may have started before that version was committed,
        one started now cannot have."""
        await self._shared_load()
        if at_least is not None and self.version < at_least:
            await self._shared_load(fresh=True)

    async def _shared_load(self, fresh: bool = False) -> None:
        if fresh or self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        rows = await self._pool.fetch(LOAD_SQL)
        version = rows[0]["version"]
        if version >= self.version:  # loads that overtake each other never go back in time
            self.segments = tuple(Segment(r["id"], r["slug"], r["percent"]) for r in rows if r["id"] is not None)
            self.version = version
        self.healthy = True

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as error:  # the loop keeps trying; /readyz reports it meanwhile
            log.warning("rollout cache not loaded yet", error=repr(error))
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception as error:
                self.healthy = False
                log.warning("rollout cache refresh failed", error=repr(error))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
