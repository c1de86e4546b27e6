"""Command status, and the HTTP gateway that publishes a validated command to its topic."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import orjson
import structlog
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.query_api import readmodel
from services.query_api.dependencies import ResourcesDep, StatusKey, WriteKey
from services.query_api.parameters import CommandIdPath
from services.query_api.schemas import AUTH_RESPONSES, Problem, Published, json_response
from shared.client import KafkaUnavailable
from shared.commands import command_adapter, command_json_schema
from shared.durations import format_duration
from shared.outcomes import Outcome
from shared.validation import sentence

log = structlog.get_logger("query_api")
MAX_WAIT_SECONDS = 30
WAIT_POLL_SECONDS = 0.05  # a long poll looks again this often: an outcome is seen within it of being stored

router = APIRouter(tags=["commands"], responses=AUTH_RESPONSES)

COMMAND_EXAMPLES = {
    "create_segment": {"value": {"type": "create_segment", "slug": "AVITO_VOICE_MESSAGES", "percent": 10}},
    "update_segment": {"value": {"type": "update_segment", "slug": "AVITO_VOICE_MESSAGES", "percent": 20}},
    "delete_segment": {"value": {"type": "delete_segment", "slug": "AVITO_VOICE_MESSAGES"}},
    "create_user": {"value": {"type": "create_user", "user_id": 1000}},
    "update_user_segments": {"value": {"type": "update_user_segments", "command_id": "c-42", "user_id": 1000,
                                       "add": ["AVITO_VOICE_MESSAGES"], "remove": ["AVITO_DISCOUNT_30"],
                                       "ttl_seconds": 86400}},
}


@router.get("/commands/{command_id}", response_model=Outcome, responses={404: {"model": Problem}},
            summary="The outcome of a consumed command")
async def get_command(command_id: CommandIdPath, resources: ResourcesDep, _key: StatusKey,
                      wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description=(
                          "Seconds to wait for the outcome if it is not stored yet (a long poll); 0: answer "
                          "at once"))] = 0) -> Response:
    deadline = time.monotonic() + wait
    while (found := await readmodel.command_outcome(resources.pool, command_id)) is None:  # the primary
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(WAIT_POLL_SECONDS)
    if found is None:
        window = format_duration(resources.outcome_retention)
        raise HTTPException(404, f"command {command_id} has no outcome: it has not been processed (yet), or it "
                                 f"was processed longer ago than the outcome window (OUTCOME_RETENTION, {window}) "
                                 "and its outcome has expired")
    outcome, token = found
    return json_response(outcome.contract(token))


COMMAND_SCHEMA, COMMAND_DEFINITIONS = command_json_schema()  # app.py adds the definitions to the document
COMMAND_BODY = {
    "required": True,
    "content": {"application/json": {"schema": COMMAND_SCHEMA, "examples": COMMAND_EXAMPLES}},
}


@router.post("/commands", status_code=202, response_model=Published, openapi_extra={"requestBody": COMMAND_BODY},
             responses={422: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
             summary="Validate a command and publish it to its topic with its key")
async def post_command(request: Request, resources: ResourcesDep, key: WriteKey):
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError as error:
        raise HTTPException(422, f"body is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise HTTPException(422, "a command is a JSON object")
    try:
        if key is not None:
            command_adapter.validate_python(raw)  # the body as sent must be valid, actor included
            raw["actor"] = key.name  # who did it is the key's name, whatever the body says
        sent = await resources.publisher.publish(raw, traceparent=request.headers.get("traceparent"))
    except ValidationError as error:
        problems = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in error.errors(include_url=False, include_context=False, include_input=False)]
        return JSONResponse({"detail": problems, "message": sentence(error, limit=None)}, status_code=422)
    except KafkaUnavailable as error:
        raise HTTPException(503, str(error)) from error
    log.info("command published", command_id=sent.command_id, type=raw.get("type"), actor=raw.get("actor"),
             topic=sent.topic, partition=sent.partition, offset=sent.offset,
             traceparent=request.headers.get("traceparent"))
    return JSONResponse({"command_id": sent.command_id, "topic": sent.topic, "partition": sent.partition,
                         "offset": sent.offset}, status_code=202)
