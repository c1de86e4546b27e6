"""Shared resources of the API, created once in the lifespan and handed to routes as dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from services.query_api.batched_lookup import BatchedLookup
from services.query_api.reports import ReportSigner
from services.query_api.rollout_cache import RolloutCache
from shared.client import CommandPublisher
from shared.settings import Settings


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    rollout: RolloutCache
    signer: ReportSigner
    publisher: CommandPublisher
    memberships: BatchedLookup  # GET /users/{id}/segments' lookups, on connections of their own

    def report_link(self, request: Request, year: int, month: int, user_id: int | None) -> str:
        """The absolute, signed link to a month's history CSV (of one user, or of all)."""
        base = self.settings.api_public_url or str(request.base_url)
        return f"{base.rstrip('/')}/reports/download?token={self.signer.sign(year, month, user_id)}"


async def get_resources(request: Request) -> Resources:
    # async: a plain def dependency would run in the thread pool, a thread hop per request
    return request.app.state.resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]
