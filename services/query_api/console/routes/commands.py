"""A command's outcome, polled until the consumer has stored it."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.query_api import readmodel
from services.query_api.console.access import StatusReader
from services.query_api.console.deps import command_page, resources_of
from services.query_api.console.queries import record_trace_id
from services.query_api.console.rendering import POLL_DONE, render, see_other
from services.query_api.parameters import CommandIdPath

router = APIRouter(prefix="/ui", include_in_schema=False)




@router.get("/commands")
async def find_command(request: Request, visitor: StatusReader, command_id: str = "") -> Response:
    if command_id.strip():
        return see_other(request, visitor, command_page(command_id.strip()))
    return render(request, visitor, "find_command.html")


async def _outcome_context(request: Request, command_id: str) -> dict[str, Any]:
    resources = resources_of(request)
    found = await readmodel.command_outcome(resources.pool, command_id)
    if found is None:
        return {"command_id": command_id, "outcome": None}
    row, token = found
    outcome = row.contract(token)
    trace_url = None
    template = resources.console.ui_trace_url
    if template:
        trace_id = await record_trace_id(resources.kafka, row.source_topic, row.source_partition,
                                         row.source_offset)
        trace_url = template.replace("{trace_id}", trace_id) if trace_id else None
    result = orjson.dumps(outcome["result"], option=orjson.OPT_INDENT_2).decode() if outcome["result"] else None
    return {"command_id": command_id, "outcome": outcome, "result": result, "trace_url": trace_url,
            "tracing": bool(template)}


@router.get("/commands/{command_id}")
async def command_view(request: Request, command_id: CommandIdPath, visitor: StatusReader) -> Response:
    context = await _outcome_context(request, command_id)
    return render(request, visitor, "command.html", poll=f"{command_page(command_id)}/outcome", **context)


@router.get("/commands/{command_id}/outcome")
async def command_outcome_fragment(request: Request, command_id: CommandIdPath, visitor: StatusReader) -> Response:
    context = await _outcome_context(request, command_id)
    headers = {POLL_DONE: "1"} if context["outcome"] else None
    return render(request, visitor, "_outcome.html", headers=headers, **context)
