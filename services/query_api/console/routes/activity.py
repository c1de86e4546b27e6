"""Recent commands and their outcomes, newest first: filtered by type, status, actor, the user or
segment they were about, and a start time; keyset pages."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.query_api.console.access import StatusReader
from services.query_api.console.deps import ConsoleError, resources_of
from services.query_api.console.rendering import render
from shared.commands import MAX_USER_ID
from shared.durations import parse_moment
from shared.outcomes import Status

router = APIRouter(prefix="/ui", include_in_schema=False)

PER_PAGE = 50
TYPES = ("create_segment", "update_segment", "delete_segment", "create_user", "update_user_segments")
STATUSES = tuple(str(status) for status in Status)
# Newest first by the command record's time, the partition key (ties broken by id), from the
# command_outcomes_recent index; each filter is off when its parameter is NULL.
ACTIVITY_SQL = """
SELECT command_id, type, status, error, processed_at, actor, recorded_at, subject_user_id, subject_slug
FROM command_outcomes
WHERE ($1::text IS NULL OR type = $1) AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR actor = $3)
  AND ($4::bigint IS NULL OR subject_user_id = $4) AND ($5::text IS NULL OR subject_slug = $5)
  AND ($6::timestamptz IS NULL OR recorded_at >= $6)
  AND ($7::timestamptz IS NULL OR (recorded_at, command_id) < ($7, $8::text))
ORDER BY recorded_at DESC, command_id DESC
LIMIT $9
"""


def _cursor(text: str) -> tuple[datetime, str] | tuple[None, None]:
    """A page's position: the last row's record time and command id, `time|id`."""
    if not text:
        return None, None
    moment, separator, command_id = text.partition("|")
    try:
        return parse_moment(moment), command_id if separator and command_id else _bad(text)
    except ValueError:
        return _bad(text)


def _bad(text: str):
    raise ConsoleError(422, "Not a page of this list", f"{text[:80]!r} is not a position in the activity list. "
                       "Start again from the first page.")


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str | None:
    if value and value not in allowed:
        raise ConsoleError(422, f"Not a {name}", f"{value[:40]!r} is not a {name}: " + ", ".join(allowed) + ".")
    return value or None


@router.get("/activity")
async def activity(request: Request, visitor: StatusReader, kind: Annotated[str, Query(alias="type")] = "",
                   status: str = "",
                   actor: Annotated[str, Query(max_length=128)] = "",
                   user: Annotated[int | None, Query(ge=1, le=MAX_USER_ID)] = None,
                   segment: Annotated[str, Query(max_length=200)] = "", since: str = "",
                   after: str = "") -> Response:
    filters: dict[str, Any] = {"type": _choice(kind, TYPES, "command type"),
                               "status": _choice(status, STATUSES, "status"),
                               "actor": actor.strip() or None, "user": user, "segment": segment.strip() or None}
    try:
        start = parse_moment(since) if since.strip() else None
    except ValueError as error:
        raise ConsoleError(422, "Not a time", str(error)) from None
    moment, command_id = _cursor(after)

    async def fetch(pool: asyncpg.Pool) -> list[asyncpg.Record]:
        return await pool.fetch(ACTIVITY_SQL, filters["type"], filters["status"], filters["actor"], filters["user"],
                                filters["segment"], start, moment, command_id, PER_PAGE + 1)

    rows = await resources_of(request).reads.read(fetch, replica_first=True)
    shown, more = rows[:PER_PAGE], len(rows) > PER_PAGE
    last = shown[-1] if more else None
    query = {name: value for name, value in {**filters, "since": since.strip()}.items() if value}
    return render(request, visitor, "activity.html", rows=shown, types=TYPES, statuses=STATUSES, query=query,
                  paged=bool(after), next_page=f"{last['recorded_at'].isoformat()}|{last['command_id']}"
                  if last else None, since=since.strip(), chosen={key: value or "" for key, value in filters.items()})
