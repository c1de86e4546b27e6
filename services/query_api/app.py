"""The FastAPI application: wiring of the pool, the rollout cache, the signer and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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
from services.query_api.routes import asyncapi, commands, documentation, health, reports, segments, users
from services.query_api.schemas import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from services.query_api.signing import REPORT_LINKS, check_signing_secret, purpose_key
from shared import tracing
from shared.api_keys import KeyFileError
from shared.client import CommandPublisher, KafkaUnavailable
from shared.db import TRANSIENT_DB_ERRORS, create_pool
from shared.kafka import KafkaSetupError
from shared.settings import ApiSettings, ConsoleSettings, KafkaSettings, Settings, get_settings
from shared.validation import field_name, rule

log = structlog.get_logger("query_api")
DESCRIPTION = """
Reads of the user segmentation service: which segments a user is in (explicit memberships that
have not expired plus percent rollout), segments, command outcomes, monthly history reports as
signed CSV links, and an HTTP gateway that publishes commands to Kafka.
"""


def check_production_settings(settings: ApiSettings, console_enabled: bool) -> None:
    check_signing_secret(settings)
    if settings.environment == "development":
        return
    if settings.api_auth == "enabled" and settings.api_keys_file is None:
        raise SystemExit("ENVIRONMENT=production needs API keys: set API_KEYS_FILE (make one with "
                         "`segmentctl keys create`), or API_AUTH=disabled when a gateway in front authenticates.")
    if console_enabled:
        log.info("the web console is on at /ui (UI_ENABLED=true)")
    if not settings.api_public_url:
        log.warning("API_PUBLIC_URL is not set: report links name the request's host only when REPORT_LINK_HOSTS "
                    "lists it, else the address the request reached; set it to the API's public base URL")


def key_ring(settings: ApiSettings) -> KeyRing:
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


async def invalid_request(request, error: RequestValidationError) -> Response:
    """FastAPI's structured 422, with every problem also in words (the field and its rule)."""
    message = "; ".join(f"{field_name(item['loc'])}: {rule(item)}" for item in error.errors())
    return JSONResponse({"detail": jsonable_encoder(error.errors()), "message": message}, status_code=422)


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


UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: noise in every backend


class SegmentationAPI(FastAPI):
    """FastAPI, with the hot read answered before anything else runs (see fast_path.py). Every other
    request's server span is FastAPI's own (one span a request, named by its route template)."""

    traces_requests = False  # whether requests other than the hot read get server spans

    async def __call__(self, scope, receive, send) -> None:
        resources = getattr(self.state, "resources", None)  # set once the lifespan has started
        if resources is not None and await answer_user_segments(resources, scope, send):
            return  # the hot read, answered (and traced) by fast_path.py
        await super().__call__(scope, receive, send)


def _untraced(scope) -> bool:
    """FastAPI's telemetry skips a request for which this is true: tracing off, or a probe."""
    return not tracing.ENABLED or scope.get("path") in UNTRACED_PATHS


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_production_settings(settings.section(ApiSettings), console_enabled=settings.console_enabled)
    keys = key_ring(settings.section(ApiSettings))

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
            publisher = CommandPublisher(settings.section(KafkaSettings))
            opened.push_async_callback(publisher.stop)
            await _connect(publisher)
            reads = ReadRouter(pool, BatchedLookup(read_pool, USER_SEGMENTS_SQL), settings.read_database_urls,
                               read_pool_size=settings.read_pool_size, pool_size=settings.db_pool_max_size,
                               max_lag_ms=settings.max_replica_lag_ms, token_wait_ms=settings.read_token_wait_ms,
                               poll_interval_ms=settings.replica_poll_interval_ms)
            await reads.start()
            opened.push_async_callback(reads.stop)
            signer = ReportSigner(purpose_key(settings.report_signing_secret.get_secret_value(), REPORT_LINKS),
                                  settings.report_link_ttl_seconds)
            app.state.resources = Resources(settings.section(ApiSettings), settings.section(KafkaSettings),
                                            settings.section(ConsoleSettings), settings.outcome_retention, pool,
                                            rollout, signer, publisher, reads, keys)
            keys.start()
            opened.push_async_callback(keys.stop)
            if keys.enabled and threading.current_thread() is threading.main_thread():
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, keys.reload)
                opened.callback(loop.remove_signal_handler, signal.SIGHUP)
            yield

    traced = tracing.ENABLED and not tracing.skipped("fastapi")
    app = SegmentationAPI(title="User segmentation service", version="1.0.0", description=DESCRIPTION,
                          lifespan=lifespan, docs_url=None, redoc_url=None,
                          telemetry={"tracing": traced, "metrics": False, "logs": False, "operation_spans": False,
                                     "exclude": _untraced})
    app.traces_requests = traced
    for module in (users, segments, reports, commands, health, asyncapi, documentation):
        app.include_router(module.router)
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # first call: add the command definitions POST /commands refers to
            document = default_openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(commands.COMMAND_DEFINITIONS)
        return app.openapi_schema

    app.openapi = openapi
    if settings.console_enabled:
        console.install(app, settings.section(ConsoleSettings), settings.section(ApiSettings),
                        settings.outcome_retention, keys)
    for error in TRANSIENT_DB_ERRORS:
        app.add_exception_handler(error, database_unavailable)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app
