"""The AsyncAPI document of the command topics, generated from shared.asyncapi for this deployment's
topic names. Read-only: the page has no "try it out" that could publish to the broker."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from services.query_api.dependencies import ResourcesDep
from shared import asyncapi
from shared.settings import Settings

router = APIRouter(tags=["documentation"])


def _documents(settings: Settings) -> tuple[str, str, str]:
    return _render(settings.model_dump_json())


@cache
def _render(settings_json: str) -> tuple[str, str, str]:
    settings = Settings.model_validate_json(settings_json)
    return asyncapi.document_html(settings), asyncapi.document_yaml(settings), asyncapi.document_json(settings)


@router.get("/asyncapi", response_class=HTMLResponse, summary="The command topics' AsyncAPI document, rendered")
async def asyncapi_page(resources: ResourcesDep) -> HTMLResponse:
    return HTMLResponse(_documents(resources.settings)[0])


@router.get("/asyncapi.yaml", response_class=Response, summary="The command topics' AsyncAPI document (YAML)",
            responses={200: {"content": {"application/yaml": {}}}})
async def asyncapi_yaml(resources: ResourcesDep) -> Response:
    return Response(_documents(resources.settings)[1], media_type="application/yaml")


@router.get("/asyncapi.json", response_class=Response, summary="The command topics' AsyncAPI document (JSON)",
            responses={200: {"content": {"application/json": {}}}})
async def asyncapi_json(resources: ResourcesDep) -> Response:
    return Response(_documents(resources.settings)[2], media_type="application/json")
