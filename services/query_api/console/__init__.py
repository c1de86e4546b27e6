"""The web console at /ui, for the people who run experiments and answer support requests: segments,
a user's segments and history, command outcomes, and bulk import (README: "The web console").

On by default in development; in production only with UI_ENABLED=true. Its assets are served by
the API itself (no CDN: the service runs without internet), and the hot read never reaches it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from services.query_api.auth import KeyRing
from services.query_api.console.access import SignInNeeded, visitor_of
from services.query_api.console.deps import Console, ConsoleError
from services.query_api.console.import_tokens import ImportTokens
from services.query_api.console.rendering import render, see_other
from services.query_api.console.routes import activity, commands, imports, segments, signin, users
from services.query_api.console.session import Sessions, SignOuts
from services.query_api.signing import IMPORT_TOKENS, purpose_key
from shared.settings import ApiSettings, ConsoleSettings

STATIC = Path(__file__).with_name("static")


def install(app: FastAPI, settings: ConsoleSettings, api: ApiSettings, outcome_retention: int, keys: KeyRing) -> None:
    """Serve the console from `app` (create_app calls this when the console is enabled)."""
    secret = api.report_signing_secret.get_secret_value()
    sign_outs = SignOuts(lambda: app.state.resources.pool)
    app.state.console = Console(
        Sessions(secret, keys, int(settings.ui_session_hours * 3600), sign_outs),
        # An import's page is useful while its outcomes are kept, and no longer.
        ImportTokens(purpose_key(secret, IMPORT_TOKENS), max_age_seconds=outcome_retention),
        secure_cookies=(api.api_public_url or "").startswith("https://"))
    for routes in (signin, segments, users, activity, commands, imports):
        app.include_router(routes.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")

    async def explain(request: Request, error: ConsoleError) -> Response:
        return render(request, await visitor_of(request), "error.html", status=error.status, error=error)

    async def sign_in_first(request: Request, needed: SignInNeeded) -> Response:
        return see_other(request, await visitor_of(request), f"/ui/signin?{urlencode({'next': needed.then})}")

    app.add_exception_handler(ConsoleError, explain)
    app.add_exception_handler(SignInNeeded, sign_in_first)
