"""Signing in and out of the console with an API key."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.query_api.console.access import VisitorDep
from services.query_api.console.deps import checked_form, console_of, field
from services.query_api.console.rendering import render, see_other

log = structlog.get_logger("query_api")
router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
@router.get("/")
async def home(request: Request, visitor: VisitorDep) -> Response:
    return see_other(request, visitor, "/ui/segments")


def _safe_next(then: str) -> str:
    """Only a page of the console: never an address elsewhere (an open redirect)."""
    return then if then.startswith("/ui/") and not then.startswith("/ui//") and "\\" not in then else "/ui/segments"


@router.get("/signin")
async def signin_page(request: Request, visitor: VisitorDep, next: str = "/ui/segments") -> Response:
    if not visitor.access_control:
        return see_other(request, visitor, _safe_next(next))
    return render(request, visitor, "signin.html", then=_safe_next(next))


@router.post("/signin")
async def signin(request: Request, visitor: VisitorDep) -> Response:
    form = await checked_form(request, visitor)
    then = _safe_next(field(form, "next"))
    signed_in = console_of(request).sessions.signed_in(field(form, "api_key"))
    if signed_in is None:
        log.warning("console sign-in refused: unknown or revoked key")
        return render(request, visitor, "signin.html", status=401, then=then,
                      problem="This API key is not valid: it is unknown or has been revoked.")
    log.info("console sign-in", key=signed_in.name)
    return see_other(request, signed_in, then)


@router.post("/signout")
async def signout(request: Request, visitor: VisitorDep) -> Response:
    await checked_form(request, visitor)
    return see_other(request, await console_of(request).sessions.signed_out(visitor), "/ui/signin")
