"""Command status, and the HTTP gateway that publishes a validated command to its topic."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

import orjson
import structlog
from aiokafka.errors import KafkaError
from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.query_api import readmodel
from services.query_api.dependencies import Resources, ResourcesDep
from services.query_api.schemas import Problem, Published, json_response
from shared.commands import SEGMENT_COMMAND_TYPES, command_adapter, command_json_schema, partition_key
from shared.kafka import create_producer
from shared.outcomes import Outcome, outcome_from_record

log = structlog.get_logger("query_api")
router = APIRouter(tags=["commands"])
PUBLISH_TIMEOUT_SECONDS = 5.0

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
async def get_command(command_id: Annotated[str, Path(min_length=1, max_length=200)],
                      resources: ResourcesDep) -> Response:
    row = await readmodel.command_outcome(resources.pool, command_id)
    if row is None:
        raise HTTPException(404, f"command {command_id} has not been processed (yet)")
    return json_response(outcome_from_record(row))


async def _producer(resources: Resources):
    if resources.producer is None:
        producer = create_producer(resources.settings)
        try:
            await asyncio.wait_for(producer.start(), PUBLISH_TIMEOUT_SECONDS)
        except (TimeoutError, KafkaError, OSError) as error:
            await producer.stop()
            raise HTTPException(503, f"Kafka is unavailable: {error!r}") from error
        resources.producer = producer
    return resources.producer


COMMAND_SCHEMA, COMMAND_DEFINITIONS = command_json_schema()  # app.py adds the definitions to the document
COMMAND_BODY = {
    "required": True,
    "content": {"application/json": {"schema": COMMAND_SCHEMA, "examples": COMMAND_EXAMPLES}},
}


@router.post("/commands", status_code=202, response_model=Published, openapi_extra={"requestBody": COMMAND_BODY},
             responses={422: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
             summary="Validate a command and publish it to its topic with its key")
async def post_command(request: Request, resources: ResourcesDep):
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError as error:
        raise HTTPException(422, f"body is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise HTTPException(422, "a command is a JSON object")
    try:
        command = command_adapter.validate_python(raw)
    except ValidationError as error:
        problems = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in error.errors(include_url=False, include_context=False, include_input=False)]
        raise HTTPException(422, problems) from error
    command_id = command.command_id or uuid.uuid4().hex
    raw["command_id"] = command_id  # producers asking over HTTP get an id to ask the status with
    settings = resources.settings
    topic = (settings.segments_commands_topic if command.type in SEGMENT_COMMAND_TYPES
             else settings.assignments_commands_topic)
    producer = await _producer(resources)
    headers = []
    if traceparent := request.headers.get("traceparent"):
        headers.append(("traceparent", traceparent.encode()))
    try:
        metadata = await asyncio.wait_for(
            producer.send_and_wait(topic, orjson.dumps(raw), key=partition_key(command), headers=headers),
            PUBLISH_TIMEOUT_SECONDS)
    except (TimeoutError, KafkaError, OSError) as error:
        raise HTTPException(503, f"Kafka is unavailable, the command was not published: {error!r}") from error
    log.info("command published", command_id=command_id, topic=topic, partition=metadata.partition,
             offset=metadata.offset, traceparent=request.headers.get("traceparent"))
    return JSONResponse({"command_id": command_id, "topic": topic, "partition": metadata.partition,
                         "offset": metadata.offset}, status_code=202)
