"""The segments: the list, one segment, and the forms that create, change and delete them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.query_api.console.access import Reader, Writer
from services.query_api.console.charts import daily_chart
from services.query_api.console.deps import (
    ConsoleError,
    FormProblem,
    checked_form,
    field,
    publish,
    published,
    resources_of,
)
from services.query_api.console.queries import segments_page
from services.query_api.console.rendering import render
from services.query_api.console.routes.commands import change_made_here
from services.query_api.console.segment_page import (
    SEGMENT_SQL,
    NotAPeriod,
    daily,
    period_bounds,
    recent_members,
    rollout_changes,
)
from services.query_api.parameters import SlugPath
from shared.durations import parse_moment

router = APIRouter(prefix="/ui", include_in_schema=False)




MEMBERS_SHOWN = 50
SORTS = {"slug": "slug, A to Z", "percent": "percent, highest first", "size": "explicit members, most first"}
MAX_SEARCH = 200


def _after(order: str, text: str) -> tuple[str, Decimal | int] | None:
    """A page's position: the slug of the row before it; by percent or size, `key:slug`."""
    if not text:
        return None
    if order == "slug":
        return text, 0
    key, separator, slug = text.partition(":")
    try:
        value = Decimal(key) if order == "percent" else int(key)
    except (InvalidOperation, ValueError):
        value = None
    if not separator or not slug or value is None or (isinstance(value, Decimal) and not value.is_finite()):
        raise ConsoleError(422, "Not a page of this list", f"{text[:80]!r} is not a position in the list sorted by "
                           f"{order}. Start again from the first page.")
    return slug, value


def _cursor(order: str, after: tuple[str, Decimal | int]) -> str:
    slug, key = after
    return slug if order == "slug" else f"{key}:{slug}"


@router.get("/segments")
async def segments_list(request: Request, visitor: Reader, q: str = "", sort: str = "slug",
                        after: str = "") -> Response:
    return await _list_page(request, visitor, q, sort, after)


async def _list_page(request: Request, visitor: Reader, q: str = "", sort: str = "slug", after: str = "",
                     status: int = 200, **form: Any) -> Response:
    if sort not in SORTS:
        raise ConsoleError(422, "Not a sort order", f"{sort[:40]!r} is not an order of this list: "
                           + ", ".join(SORTS) + ".")
    if len(q) > MAX_SEARCH:
        raise ConsoleError(422, "Search too long", f"Search for at most {MAX_SEARCH} characters.")
    position = _after(sort, after)
    page = await resources_of(request).reads.read(lambda pool: segments_page(pool, q, sort, position),
                                                    replica_first=True)
    return render(request, visitor, "segments.html", status=status, segments=page.rows, known_users=page.known_users,
                  matching=page.matching, search=q, sort=sort, sorts=SORTS, paged=bool(after),
                  next_page=_cursor(sort, page.next_after) if page.next_after else None, **form)


def _percent(text: str) -> int | float:
    """A form's percent as the JSON number the command carries."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise FormProblem({"percent": f"{text[:40]!r} is not a number"})
    if not 0 <= value <= 100:  # before any conversion: 1e999999999 is a number too
        raise FormProblem({"percent": f"{text[:40]} is not from 0 to 100"})
    return int(value) if value == value.to_integral_value() else float(value)


@router.post("/segments")
async def create_segment(request: Request, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    values = {name: field(form, name) for name in ("slug", "percent", "description")}
    try:
        command: dict[str, Any] = {"type": "create_segment", "slug": values["slug"],
                                   "percent": _percent(values["percent"] or "0")}
        if values["description"]:
            command["description"] = values["description"]
        command_id = await publish(request, visitor, command)
    except FormProblem as problem:  # the list again, the form as it was typed, each problem at its field
        return await _list_page(request, visitor, status=422, values=values, problems=problem.fields)
    return published(request, visitor, command_id, segment=values["slug"])


async def _live_segment(request: Request, slug: str) -> asyncpg.Record:
    segment = await resources_of(request).reads.read(lambda pool: pool.fetchrow(SEGMENT_SQL, slug),
                                                       replica_first=False)
    if segment is None:
        raise ConsoleError(404, "No such segment", f"There is no live segment {slug}.")
    return segment


def _members_after(text: str) -> tuple[datetime, int] | None:
    """A page of members: the last row's time added and user id, `time|user`."""
    if not text:
        return None
    moment, _, user = text.partition("|")
    try:
        return parse_moment(moment), int(user)
    except ValueError:
        raise ConsoleError(422, "Not a page of members", f"{text[:80]!r} is not a position in the list of "
                           "members. Start again from the first page.") from None


@router.get("/segments/{slug}")
async def segment_page(request: Request, slug: SlugPath, visitor: Reader, command: str = "",
                       period: str = "30d", members_after: str = "") -> Response:
    return await _segment_page(request, slug, visitor, period, members_after,
                               **await change_made_here(request, visitor, command))


async def _segment_page(request: Request, slug: str, visitor: Reader, period: str = "30d", members_after: str = "",
                        status: int = 200, **form: Any) -> Response:
    segment = await _live_segment(request, slug)
    try:
        first, end = period_bounds(period, datetime.now(UTC).date())
    except NotAPeriod as error:
        raise ConsoleError(422, "Not a period", str(error)) from None
    after = _members_after(members_after)
    reads = resources_of(request).reads
    days = await reads.read(lambda pool: daily(pool, slug, first, end), replica_first=True)
    changes = await reads.read(lambda pool: rollout_changes(pool, segment["id"]), replica_first=True)
    members, next_members = await reads.read(lambda pool: recent_members(pool, segment["id"], after, MEMBERS_SHOWN),
                                             replica_first=True)
    return render(request, visitor, "segment.html", status=status, segment=segment, period=period,
                  periods={"30d": "30 days", "90d": "90 days"}, chart=daily_chart(days, slug, period), days=days,
                  rollout=changes, members=members, paged_members=bool(after),
                  next_members=f"{next_members[0].isoformat()}|{next_members[1]}" if next_members else None, **form)


@router.post("/segments/{slug}")
async def update_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    values = {name: field(form, name) for name in ("percent", "description")}
    try:
        command: dict[str, Any] = {"type": "update_segment", "slug": slug, "description": values["description"]}
        if values["percent"]:
            command["percent"] = _percent(values["percent"])
        command_id = await publish(request, visitor, command)
    except FormProblem as problem:
        return await _segment_page(request, slug, visitor, status=422, values=values, problems=problem.fields)
    return published(request, visitor, command_id, stay_on=f"/ui/segments/{quote(slug, safe='')}")


@router.get("/segments/{slug}/delete")
async def delete_segment_page(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    return render(request, visitor, "delete.html", segment=await _live_segment(request, slug))


@router.post("/segments/{slug}/delete")
async def delete_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    await checked_form(request, visitor)
    command = {"type": "delete_segment", "slug": slug}
    return published(request, visitor, await publish(request, visitor, command), segment=slug)
