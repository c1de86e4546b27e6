"""The segments: the list, one segment, and the forms that create, change and delete them."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.query_api import readmodel
from services.query_api.console.access import Reader, Writer
from services.query_api.console.deps import ConsoleError, checked_form, field, publish, published, resources_of
from services.query_api.console.queries import segments
from services.query_api.console.rendering import render
from services.query_api.parameters import SlugPath

router = APIRouter(prefix="/ui", include_in_schema=False)




@router.get("/segments")
async def segments_page(request: Request, visitor: Reader) -> Response:
    rows, known = await resources_of(request).reads.read(segments, replica_first=True)
    return render(request, visitor, "segments.html", segments=rows, known_users=known)


def _percent(text: str) -> int | float:
    """A form's percent as the JSON number the command carries."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                           [f"percent: {text!r} is not a number"])
    if not 0 <= value <= 100:  # before any conversion: 1e999999999 is a number too
        raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                           [f"percent: {text} is not from 0 to 100"])
    return int(value) if value == value.to_integral_value() else float(value)


@router.post("/segments")
async def create_segment(request: Request, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    command: dict[str, Any] = {"type": "create_segment", "slug": field(form, "slug"),
                               "percent": _percent(field(form, "percent") or "0")}
    if field(form, "description"):
        command["description"] = field(form, "description")
    return published(request, visitor, await publish(request, visitor, command))


async def _live_segment(request: Request, slug: str) -> dict[str, Any]:
    segment = await resources_of(request).reads.read(lambda pool: readmodel.live_segment(pool, slug),
                                                       replica_first=False)
    if segment is None:
        raise ConsoleError(404, "No such segment", f"There is no live segment {slug}.")
    return segment


@router.get("/segments/{slug}")
async def segment_page(request: Request, slug: SlugPath, visitor: Reader) -> Response:
    return render(request, visitor, "segment.html", segment=await _live_segment(request, slug))


@router.post("/segments/{slug}")
async def update_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    command: dict[str, Any] = {"type": "update_segment", "slug": slug, "description": field(form, "description")}
    if field(form, "percent"):
        command["percent"] = _percent(field(form, "percent"))
    return published(request, visitor, await publish(request, visitor, command))


@router.get("/segments/{slug}/delete")
async def delete_segment_page(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    return render(request, visitor, "delete.html", segment=await _live_segment(request, slug))


@router.post("/segments/{slug}/delete")
async def delete_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    await checked_form(request, visitor)
    command = {"type": "delete_segment", "slug": slug}
    return published(request, visitor, await publish(request, visitor, command))
