"""How a console page is made: Jinja2 templates, the session cookie, and the security headers every
page carries."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from services.query_api.console.charts import sparkline
from services.query_api.console.dates import when
from services.query_api.console.session import COOKIE, COOKIE_PATH, Visitor

templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
templates.env.filters["when"] = when
templates.env.filters["sparkline"] = sparkline
templates.env.filters["thousands"] = lambda number: f"{number:,}"
# 30 rather than 30.00; 12.5 stays 12.5
templates.env.filters["percent"] = lambda value: f"{Decimal(str(value)).normalize():f}"

POLL_DONE = "X-Poll-Done"  # a polled region's answer is final: stop polling
# The console's own assets only; no inline script, nothing from elsewhere, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _with_session(request: Request, response: Response, visitor: Visitor) -> Response:
    if visitor.cookie:
        console = request.app.state.console
        response.set_cookie(COOKIE, visitor.cookie, max_age=console.sessions.max_age_seconds, path=COOKIE_PATH,
                            httponly=True, samesite="strict",
                            secure=console.secure_cookies or request.url.scheme == "https")
    response.headers.update(SECURITY_HEADERS)
    return response


def render(request: Request, visitor: Visitor, template: str, status: int = 200, headers: dict | None = None,
           **context: Any) -> Response:
    resources = request.app.state.resources
    response = templates.TemplateResponse(request, template, {
        "visitor": visitor, "access_control": resources.keys.enabled, "page": template.removesuffix(".html"),
        **context}, status_code=status, headers=headers)
    return _with_session(request, response, visitor)


def see_other(request: Request, visitor: Visitor, url: str) -> Response:
    return _with_session(request, RedirectResponse(url, status_code=303), visitor)


