"""History report links (signed, expiring) and the CSV download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from services.query_api.dependencies import ReportsKey, ResourcesDep
from services.query_api.parameters import Month, UserIdQuery, Year
from services.query_api.reports import (
    MonthDropped,
    ReportLinkExpired,
    ReportLinkInvalid,
    check_month_kept,
    stream_report,
)
from services.query_api.schemas import AUTH_RESPONSES, Problem, ReportLink, json_response

router = APIRouter(tags=["reports"])


@router.get("/reports/history", response_model=ReportLink, responses={**AUTH_RESPONSES, 410: {"model": Problem}},
            summary="Signed link to the history CSV of all users (or one) for a month")
async def get_history_report(year: Year, month: Month, request: Request, resources: ResourcesDep,
                             _key: ReportsKey, user_id: UserIdQuery = None) -> Response:
    try:
        await resources.reads.read(lambda pool: check_month_kept(pool, year, month), replica_first=True)
    except MonthDropped as error:
        raise HTTPException(410, str(error)) from error
    return json_response({"report_link": resources.report_link(request, year, month, user_id)})


@router.get("/reports/download", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {"example":
                "user_id,segment_slug,operation,executed_at,source,reason\n"
                "1000,AVITO_DISCOUNT_50,I,2023-08-28 10:25:25,manual,manual\n"}}},
                       403: {"model": Problem}, 410: {"model": Problem}},
            summary="Download a report CSV (streamed) from a signed link")
async def download_report(token: Annotated[str, Query(max_length=2048)], resources: ResourcesDep):
    try:
        year, month, user_id = resources.signer.verify(token)
    except ReportLinkExpired as error:
        raise HTTPException(410, str(error)) from error
    except ReportLinkInvalid as error:
        raise HTTPException(403, str(error)) from error
    name = f"history-{year:04d}-{month:02d}" + (f"-user-{user_id}" if user_id else "") + ".csv"
    # A connection first (a replica, else the primary): a server that is away means 503, not a
    # response cut off after its head.
    pool, conn = await resources.reads.read(_acquire, replica_first=True)
    try:
        await check_month_kept(conn, year, month)
    except MonthDropped as error:
        await pool.release(conn)
        raise HTTPException(410, str(error)) from error
    except BaseException:
        await pool.release(conn)
        raise
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            await pool.release(conn)

    # The stream releases the connection when it ends; the background task after the response
    # covers a client gone before the stream ever started (its generator's finally never runs).
    body = stream_report(conn, year, month, user_id, release=release, work_mem=resources.api.report_work_mem)
    return StreamingResponse(body, media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'},
                             background=BackgroundTask(release))


async def _acquire(pool):
    return pool, await pool.acquire()
