"""Reads of segments."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.query_api import readmodel
from services.query_api.dependencies import ReadKey, ResourcesDep
from services.query_api.parameters import SlugPath
from services.query_api.schemas import AUTH_RESPONSES, Problem, Segment, Segments, json_response

router = APIRouter(tags=["segments"], responses=AUTH_RESPONSES)


@router.get("/segments", response_model=Segments, summary="Live segments, sorted by slug")
async def list_segments(resources: ResourcesDep, _key: ReadKey) -> Response:
    return json_response({"segments": await resources.reads.read(readmodel.live_segments, replica_first=False)})


@router.get("/segments/{slug}", response_model=Segment, responses={404: {"model": Problem}},
            summary="One live segment")
async def get_segment(slug: SlugPath, resources: ResourcesDep, _key: ReadKey) -> Response:
    return json_response(await resources.read_one(lambda pool: readmodel.live_segment(pool, slug),
                                                  f"no live segment {slug}"))
