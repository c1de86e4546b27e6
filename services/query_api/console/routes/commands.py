"""A command's outcome, polled until the consumer has stored it."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.query_api import readmodel
from services.query_api.console.access import StatusReader
from services.query_api.console.dates import span
from services.query_api.console.deps import command_page, resources_of
from services.query_api.console.queries import command_record
from services.query_api.console.rendering import POLL_DONE, render, see_other
from services.query_api.console.session import Visitor
from services.query_api.parameters import CommandIdPath

router = APIRouter(prefix="/ui", include_in_schema=False)




@router.get("/commands")
async def find_command(request: Request, visitor: StatusReader, command_id: str = "") -> Response:
    if command_id.strip():
        return see_other(request, visitor, command_page(command_id.strip()))
    return render(request, visitor, "find_command.html")


async def outcome_context(request: Request, command_id: str) -> dict[str, Any]:
    """A command's outcome for the templates: its fields, and the user and segments it was about
    (from its record, while the topic keeps it)."""
    resources = resources_of(request)
    found = await readmodel.command_outcome(resources.pool, command_id)
    if found is None:
        return {"command_id": command_id, "outcome": None}
    row, token = found
    outcome = row.contract(token)
    record = await command_record(resources.kafka, row.source_topic, row.source_partition, row.source_offset)
    template = resources.console.ui_trace_url
    trace_url = template.replace("{trace_id}", record.trace_id) if template and record.trace_id else None
    return {"command_id": command_id, "outcome": outcome, "result": outcome["result"] or {}, "trace_url": trace_url,
            "tracing": bool(template), "about_user": record.user_id, "about_segments": record.segments}


def _may_come(request: Request, sent: float | None) -> bool:
    """Whether a command without an outcome may still get one: looked up by id (`sent` unknown),
    or published from this console (`sent`, seconds since the epoch) less than the outcome
    retention ago. The page polls only then, and console.js stops after a while in any case."""
    return sent is None or 0 <= time.time() - sent < resources_of(request).outcome_retention


@router.get("/commands/{command_id}")
async def command_view(request: Request, command_id: CommandIdPath, visitor: StatusReader,
                       user: Annotated[int | None, Query(ge=1)] = None, segment: str | None = None,
                       sent: float | None = None) -> Response:
    context = await outcome_context(request, command_id)
    waiting = context["outcome"] is None and _may_come(request, sent)
    poll = f"{command_page(command_id)}/outcome" + ("?looked_up=1" if sent is None else "") if waiting else None
    return render(request, visitor, "command.html", poll=poll, subject_user=user, subject_segment=segment,
                  looked_up=sent is None, retention=span(resources_of(request).outcome_retention), **context)


@router.get("/commands/{command_id}/outcome")
async def command_outcome_fragment(request: Request, command_id: CommandIdPath, visitor: StatusReader,
                                   looked_up: bool = False) -> Response:
    context = await outcome_context(request, command_id)
    headers = {POLL_DONE: "1"} if context["outcome"] else None
    return render(request, visitor, "_outcome.html", headers=headers, poll=True, looked_up=looked_up,
                  retention=span(resources_of(request).outcome_retention), **context)


async def change_made_here(request: Request, visitor: Visitor, command_id: str) -> dict[str, Any]:
    """For a page that a change was made on (`?command=`): the change's outcome, shown in place,
    polled until it arrives; nothing for a visitor who may not see outcomes."""
    if not command_id or not visitor.can("status") or len(command_id) > 200:  # as CommandIdPath allows
        return {}
    context = await outcome_context(request, command_id)
    return {"change": context, "change_poll": None if context["outcome"] else f"{command_page(command_id)}/outcome"}
