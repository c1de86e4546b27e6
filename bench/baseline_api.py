"""The read baseline: a minimal FastAPI + asyncpg endpoint, one straightforward query per request.

    DATABASE_URL=... uvicorn bench.baseline_api:app --workers 2
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
from fastapi import FastAPI, Request
from pydantic import BaseModel


class Segment(BaseModel):
    slug: str
    expires_at: datetime | None


class UserSegments(BaseModel):
    user_id: int
    segments: list[Segment]


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=10)
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/users/{user_id}/segments", response_model=UserSegments)
async def user_segments(user_id: int, request: Request):
    rows = await request.app.state.pool.fetch(
        """SELECT s.slug, m.expires_at FROM memberships m JOIN segments s ON s.id = m.segment_id
           WHERE m.user_id = $1 AND s.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
           ORDER BY s.slug""",
        user_id,
    )
    return {"user_id": user_id, "segments": [dict(row) for row in rows]}
