"""Reads of one user: segments (the hot path), registration, history report link."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from services.query_api import readmodel, user_segments
from services.query_api.dependencies import ConsistencyToken, ReadKey, ReportsKey, ResourcesDep
from services.query_api.parameters import USER_SEGMENTS_PATH, Month, UserIdPath, Year
from services.query_api.schemas import (
    AUTH_RESPONSES,
    UNAVAILABLE_RESPONSES,
    Problem,
    ReportLink,
    User,
    UserSegments,
    json_response,
)
from shared.outcomes import format_timestamp

router = APIRouter(tags=["users"], responses=AUTH_RESPONSES)


@router.get(USER_SEGMENTS_PATH, response_model=UserSegments, responses=UNAVAILABLE_RESPONSES,
            summary="Segments the user is in now (explicit, unexpired, plus percent rollout)")
async def get_user_segments(user_id: UserIdPath, resources: ResourcesDep, _key: ReadKey,
                            token: ConsistencyToken) -> Response:
    # Well-formed requests are normally answered by fast_path.py before routing; this is the same answer.
    status, body, headers = await user_segments.answer(resources, user_id, token)
    return Response(body, status_code=status, headers={name.decode(): value.decode() for name, value in headers})


@router.get("/users/{user_id}", response_model=User, responses={404: {"model": Problem}},
            summary="When the user was first seen")
async def get_user(user_id: UserIdPath, resources: ResourcesDep, _key: ReadKey) -> Response:
    row = await resources.read_one(lambda pool: readmodel.user(pool, user_id), f"user {user_id} has never been seen")
    return json_response({"user_id": row["user_id"], "registered_at": format_timestamp(row["registered_at"])})


@router.get("/users/{user_id}/history", response_model=ReportLink,
            summary="Signed link to the user's history CSV for a month")
async def get_user_history(user_id: UserIdPath, year: Year, month: Month, request: Request,
                           resources: ResourcesDep, _key: ReportsKey) -> Response:
    return json_response({"report_link": resources.report_link(request, year, month, user_id)})
