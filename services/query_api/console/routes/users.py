"""A user: its segments now, its month of history, and the form that changes its segments."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.query_api import readmodel
from services.query_api.console.access import Reader, Writer
from services.query_api.console.deps import (
    ConsoleError,
    FormProblem,
    checked_form,
    field,
    publish,
    published,
    resources_of,
)
from services.query_api.console.queries import user_history
from services.query_api.console.rendering import render, see_other
from services.query_api.console.routes.commands import change_made_here
from services.query_api.parameters import UserIdPath
from services.query_api.reports import MonthDropped
from shared.commands import MAX_USER_ID
from shared.durations import parse_duration

router = APIRouter(prefix="/ui", include_in_schema=False)


HISTORY_PER_PAGE = 100
REASONS = {"manual": "by a command", "ttl": "its time to live ended", "segment_deleted": "the segment was deleted",
           "percent_changed": "the rollout's percent changed", "created": "the segment was created"}
MAX_HISTORY_PAGE = 100  # beyond, the month's CSV
# The add field suggests the most recently created live segments: a list of every segment would
# cost each user page its rendering once there are thousands.
SUGGESTED = 200
SUGGESTED_SQL = "SELECT slug FROM segments WHERE deleted_at IS NULL ORDER BY created_at DESC, slug LIMIT $1"
MONTH = re.compile(r"(\d{4})-(\d{2})")



@router.get("/users")
async def find_user(request: Request, visitor: Reader, user_id: str = "") -> Response:
    if not user_id:
        return render(request, visitor, "find_user.html")
    if not re.fullmatch(r"[0-9]{1,19}", user_id.strip()) or not 1 <= int(user_id) <= MAX_USER_ID:
        return render(request, visitor, "find_user.html", status=422, user_id=user_id,
                      problem=f"{user_id!r} is not a user id: a whole number from 1 to {MAX_USER_ID}.")
    return see_other(request, visitor, f"/ui/users/{int(user_id)}")


def _month(text: str) -> tuple[int, int]:
    found = MONTH.fullmatch(text)
    if not found or not 1 <= int(found[2]) <= 12 or int(found[1]) < 1:
        raise ConsoleError(422, "Not a month", f"{text!r} is not a month: write it as YYYY-MM, e.g. 2026-11.")
    return int(found[1]), int(found[2])


@router.get("/users/{user_id}")
async def user_page(request: Request, user_id: UserIdPath, visitor: Reader, month: str = "",
                    command: str = "", page: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 1) -> Response:
    return await _user_page(request, user_id, visitor, month, page=page,
                            **await change_made_here(request, visitor, command))


async def _user_page(request: Request, user_id: int, visitor: Reader, month: str = "", status: int = 200,
                     page: int = 1, **extra: Any) -> Response:
    resources = resources_of(request)
    now = datetime.now(UTC)
    year, number = _month(month) if month else (now.year, now.month)
    found = await resources.reads.memberships(user_id, None)
    member_of = await readmodel.user_segments_list(found, resources.rollout, user_id)
    registered = await resources.reads.read(lambda pool: readmodel.user(pool, user_id), replica_first=True)
    live = await resources.reads.read(lambda pool: pool.fetch(SUGGESTED_SQL, SUGGESTED), replica_first=True)
    history, more, dropped, link = [], False, None, None
    if visitor.can("reports"):
        try:
            # The month's rows up to this page's last (a user's month is short; the stream is the report's).
            history, more = await resources.reads.read(
                lambda pool: user_history(pool, user_id, year, number, page * HISTORY_PER_PAGE), replica_first=True)
            history = history[(page - 1) * HISTORY_PER_PAGE:]
            link = resources.report_link(request, year, number, user_id)
        except MonthDropped as error:
            dropped = str(error)
    return render(request, visitor, "user.html", status=status, user_id=user_id, segments=member_of, live=live,
                  registered_at=registered["registered_at"] if registered else None,
                  month=f"{year:04d}-{number:02d}", history=history, more=more, dropped=dropped, report_link=link,
                  history_page=page, last_history_page=page >= MAX_HISTORY_PAGE, reasons=REASONS, **extra)


def _slugs(text: str) -> list[str]:
    return [slug for slug in re.split(r"[\s,]+", text) if slug]


@router.post("/users/{user_id}/segments")
async def change_user_segments(request: Request, user_id: UserIdPath, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    values = {"add": field(form, "add"), "ttl": field(form, "ttl"),
              "remove": [value for value in form.getlist("remove") if isinstance(value, str) and value]}
    try:
        command_id = await publish(request, visitor, _user_command(user_id, values))
    except FormProblem as problem:  # the page again, as it was filled in, each problem at its field
        return await _user_page(request, user_id, visitor, status=422, values=values, problems=problem.fields)
    return published(request, visitor, command_id, stay_on=f"/ui/users/{user_id}")


def _user_command(user_id: int, values: dict[str, Any]) -> dict[str, Any]:
    add, remove = _slugs(values["add"]), values["remove"]
    if not add and not remove:
        raise FormProblem({"add": "name segments to add, or tick segments to remove"}, "Nothing to change.")
    command: dict[str, Any] = {"type": "update_user_segments", "user_id": user_id, "add": add, "remove": remove}
    if values["ttl"]:
        if not add:
            raise FormProblem({"ttl": "a time to live only applies to segments being added"})
        try:
            command["ttl_seconds"] = parse_duration(values["ttl"])
        except ValueError as error:
            raise FormProblem({"ttl": str(error)}) from None
    return command
