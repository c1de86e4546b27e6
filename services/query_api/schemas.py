"""Response models: they document the API (OpenAPI, /docs) with an example each."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field


def _example(value: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [value]})


class UserSegment(BaseModel):
    slug: str
    source: Literal["manual", "auto"]
    expires_at: datetime | None


class UserSegments(BaseModel):
    model_config = _example({"user_id": 1000, "segments": [
        {"slug": "AVITO_DISCOUNT_30", "source": "auto", "expires_at": None},
        {"slug": "AVITO_VOICE_MESSAGES", "source": "manual", "expires_at": "2026-12-01T00:00:00.000Z"}]})
    user_id: int
    segments: list[UserSegment]


class User(BaseModel):
    model_config = _example({"user_id": 1000, "registered_at": "2026-11-28T10:00:00.123Z"})
    user_id: int
    registered_at: datetime


class Segment(BaseModel):
    model_config = _example({"slug": "AVITO_VOICE_MESSAGES", "percent": 10.0, "description": "voice messages",
                             "created_at": "2026-11-28T10:00:00.123Z"})
    slug: str
    percent: float
    description: str | None
    created_at: datetime


class Segments(BaseModel):
    segments: list[Segment]


class ReportLink(BaseModel):
    model_config = _example({"report_link": "http://127.0.0.1:8080/reports/download?token=eyJ5Ijoy..."})
    report_link: str


class Published(BaseModel):
    model_config = _example({"command_id": "c-42", "topic": "assignments.commands", "partition": 3,
                             "offset": 1042})
    command_id: str
    topic: str
    partition: int
    offset: int


class Problem(BaseModel):
    model_config = _example({"detail": "user 1000 has never been seen"})
    detail: str | list = Field(description="what is wrong (for a 422: each problem with its location and type)")
    message: str | None = Field(None, description="for a 422: every problem in words, field by field")


class Health(BaseModel):
    model_config = _example({"status": "ok", "checks": {"database": "ok", "kafka": "ok"}})
    status: str
    checks: dict[str, str] = {}


def json_response(content: object, status_code: int = 200) -> Response:
    """Serialized as built (timestamps already in the contract's format), without a second validation."""
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


AUTH_RESPONSES = {
    401: {"model": Problem, "description": "No valid API key (see WWW-Authenticate)"},
    403: {"model": Problem, "description": "The key lacks the scope this needs"},
}

DATABASE_UNAVAILABLE = "the database is unavailable; retry shortly"
RETRY_AFTER_SECONDS = "1"
UNAVAILABLE_RESPONSES = {503: {"model": Problem, "description": "The database is unavailable (see Retry-After)"}}
