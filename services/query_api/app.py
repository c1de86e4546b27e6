"""The FastAPI application: wiring of the pool, the rollout cache, the signer and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from opentelemetry import trace

from services.query_api import console
from services.query_api.auth import KeyRing
from services.query_api.batched_lookup import BatchedLookup
from services.query_api.dependencies import Resources
from services.query_api.fast_path import answer_user_segments
from services.query_api.http_metrics import BodySizeLimitMiddleware, MetricsMiddleware
from services.query_api.readmodel import USER_SEGMENTS_SQL, create_lookup_pool
from services.query_api.replicas import ReadRouter
from services.query_api.reports import ReportSigner
from services.query_api.rollout_cache import RolloutCache
from services.query_api.routes import asyncapi, commands, health, reports, segments, users
from services.query_api.schemas import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from shared import tracing
from shared.api_keys import KeyFileError
from shared.client import CommandPublisher, KafkaUnavailable
from shared.db import TRANSIENT_DB_ERRORS, create_pool
from shared.kafka import KafkaSetupError
from shared.settings import DEVELOPMENT_REPORT_SECRET, Settings, get_settings

log = structlog.get_logger("query_api")
DESCRIPTION = """
Reads of the user segmentation service: which segments a user is in (explicit memberships that
have not expired plus percent rollout), segments, command outcomes, monthly history reports as
signed CSV links, and an HTTP gateway that publishes commands to Kafka.
"""


def check_production_settings(settings: Settings) -> None:
    if settings.environment == "development":
        return
    if settings.report_signing_secret.get_secret_value() == DEVELOPMENT_REPORT_SECRET:
        raise SystemExit("REPORT_SIGNING_SECRET is the development default; set a secret of your own "
                         "before running with ENVIRONMENT=production.")
    if settings.api_auth == "enabled" and settings.api_keys_file is None:
        raise SystemExit("ENVIRONMENT=production needs API keys: set API_KEYS_FILE (make one with "
                         "`segmentctl keys create`), or API_AUTH=disabled when a gateway in front authenticates.")
    if settings.console_enabled:
        log.info("the web console is on at /ui (UI_ENABLED=true)")
    if not settings.api_public_url:
        log.warning("API_PUBLIC_URL is not set: report links are built from each request's Host header, "
                    "which a client controls; set it to the API's public base URL")


def key_ring(settings: Settings) -> KeyRing:
    """The keys in force; API_AUTH=disabled or no API_KEYS_FILE (in development) leaves the API open."""
    if settings.api_auth == "disabled":
        log.warning("API_AUTH=disabled: every caller may read, publish and fetch reports; only behind a "
                    "gateway that authenticates")
        return KeyRing(None)
    if settings.api_keys_file is None:
        log.warning("no API_KEYS_FILE: the API is open to every caller (development)")
        return KeyRing(None)
    try:
        return KeyRing(settings.api_keys_file)
    except (OSError, KeyFileError) as error:
        raise SystemExit(f"API_KEYS_FILE={settings.api_keys_file}: {error}") from None


async def database_unavailable(request, error) -> Response:
    """A lost or unreachable database is a 503 the client may retry, never a 500."""
    log.warning("database unavailable", path=request.url.path, error=repr(error))
    return JSONResponse({"detail": DATABASE_UNAVAILABLE}, status_code=503,
                        headers={"Retry-After": RETRY_AFTER_SECONDS})


async def _connect(publisher: CommandPublisher) -> None:
    """Kafka settings the broker refuses (TLS, SASL) stop the start; a broker that is merely away
    is waited for, with POST /commands answering 503 meanwhile."""
    try:
        await publisher.start()
    except KafkaSetupError as error:
        raise SystemExit(str(error)) from None
    except KafkaUnavailable as error:
        log.warning("Kafka is not reachable yet: POST /commands answers 503 until it is", error=str(error))


class SegmentationAPI(FastAPI):
    """FastAPI, with the hot read answered before anything else runs (see fast_path.py), and with
    tracing on, all of it inside OpenTelemetry's ASGI middleware (request spans named by route)."""

    entry = None  # the traced entry point, when tracing is on

    async def __call__(self, scope, receive, send) -> None:
        resources = getattr(self.state, "resources", None)  # set once the lifespan has started
        if resources is not None and await answer_user_segments(resources, scope, send):
            return  # the hot read, answered (and traced) by fast_path.py
        if self.entry is not None and scope["type"] == "http":
            await self.entry(scope, receive, send)
        else:
            await self.dispatch(scope, receive, send)

    async def dispatch(self, scope, receive, send) -> None:
        await super().__call__(scope, receive, send)
        if self.entry is not None:
            _name_request_span(scope)

    def trace_requests(self) -> None:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        def span_details(scope) -> tuple[str, dict]:
            return scope["method"], {}  # named by its route once routing has found it

        self.entry = OpenTelemetryMiddleware(self.dispatch, default_span_details=span_details,
                                             excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"])


def _name_request_span(scope) -> None:
    """Request spans are named by the route's template once routing has found it."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        span = trace.get_current_span()
        span.update_name(f"{scope['method']} {path}")
        span.set_attribute("http.route", path)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_production_settings(settings)
    keys = key_ring(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with contextlib.AsyncExitStack() as opened:  # closed in reverse, also after a failed start
            # The API's queries never change session state, so connections skip the reset round trip.
            pool = await create_pool(settings.require_database_url(), min_size=settings.db_pool_min_size,
                                     max_size=settings.db_pool_max_size, reset_sessions=False)
            opened.push_async_callback(pool.close)
            # GET /users/{id}/segments has connections of its own: a long report cannot starve it.
            read_pool = await create_lookup_pool(settings.require_database_url(), settings.read_pool_size)
            opened.push_async_callback(read_pool.close)
            rollout = RolloutCache(pool, settings.rollout_cache_refresh_seconds)
            await rollout.start()
            opened.push_async_callback(rollout.stop)
            publisher = CommandPublisher(settings)
            opened.push_async_callback(publisher.stop)
            await _connect(publisher)
            reads = ReadRouter(pool, BatchedLookup(read_pool, USER_SEGMENTS_SQL), settings.read_database_urls,
                               read_pool_size=settings.read_pool_size, pool_size=settings.db_pool_max_size,
                               max_lag_ms=settings.max_replica_lag_ms, token_wait_ms=settings.read_token_wait_ms,
                               poll_interval_ms=settings.replica_poll_interval_ms)
            await reads.start()
            opened.push_async_callback(reads.stop)
            signer = ReportSigner(settings.report_signing_secret.get_secret_value(), settings.report_link_ttl_seconds)
            app.state.resources = Resources(settings, pool, rollout, signer, publisher, reads, keys)
            keys.start()
            opened.push_async_callback(keys.stop)
            if keys.enabled and threading.current_thread() is threading.main_thread():
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, keys.reload)
                opened.callback(loop.remove_signal_handler, signal.SIGHUP)
            yield

    app = SegmentationAPI(title="User segmentation service", version="1.0.0", description=DESCRIPTION,
                          lifespan=lifespan)
    for module in (users, segments, reports, commands, health, asyncapi):
        app.include_router(module.router)
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # first call: add the command definitions POST /commands refers to
            document = default_openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(commands.COMMAND_DEFINITIONS)
        return app.openapi_schema

    app.openapi = openapi
    if settings.console_enabled:
        console.install(app, settings, keys)
    if tracing.ENABLED and not tracing.skipped("asgi"):
        app.trace_requests()
    for error in TRANSIENT_DB_ERRORS:
        app.add_exception_handler(error, database_unavailable)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app
