"""The live rollout segments, kept in memory and refreshed in the background.

A read then costs one hash per rollout segment and no extra query; a percent change is visible
within `ROLLOUT_CACHE_REFRESH_SECONDS` (default 0.25 s), well inside the 1-second freshness bound.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from shared.membership import Segment

log = structlog.get_logger(__name__)


class RolloutCache:
    def __init__(self, pool: asyncpg.Pool, refresh_seconds: float) -> None:
        self._pool = pool
        self._refresh_seconds = refresh_seconds
        self.segments: tuple[Segment, ...] = ()
        self._task: asyncio.Task | None = None
        self.healthy = False

    async def refresh(self) -> None:
        rows = await self._pool.fetch(
            "SELECT id, slug, percent FROM segments WHERE deleted_at IS NULL AND percent > 0 ORDER BY slug"
        )
        self.segments = tuple(Segment(r["id"], r["slug"], r["percent"]) for r in rows)
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
