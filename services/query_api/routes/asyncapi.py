"""The AsyncAPI document of the command topics, generated from shared.asyncapi for this deployment's
topic names (a few milliseconds to build; documentation is not a hot path). Read-only: the page has
no "try it out" that could publish to the broker."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from services.query_api.dependencies import ResourcesDep
from services.query_api.routes.documentation import with_integrity
from shared import asyncapi

router = APIRouter(tags=["documentation"])


@router.get("/asyncapi", response_class=HTMLResponse, summary="The command topics' AsyncAPI document, rendered")
async def asyncapi_page(resources: ResourcesDep) -> HTMLResponse:
    return HTMLResponse(with_integrity(asyncapi.document_html(resources.kafka)))


@router.get("/asyncapi.yaml", response_class=Response, summary="The command topics' AsyncAPI document (YAML)",
            responses={200: {"content": {"application/yaml": {}}}})
async def asyncapi_yaml(resources: ResourcesDep) -> Response:
    return Response(asyncapi.document_yaml(resources.kafka), media_type="application/yaml")


@router.get("/asyncapi.json", response_class=Response, summary="The command topics' AsyncAPI document (JSON)",
            responses={200: {"content": {"application/json": {}}}})
async def asyncapi_json(resources: ResourcesDep) -> Response:
    return Response(asyncapi.document_json(resources.kafka), media_type="application/json")
