"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from services.query_api.auth import bearer_token
from services.query_api.dependencies import ResourcesDep, authenticate
from services.query_api.schemas import Health, Problem
from shared.client import KafkaUnavailable

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok", "checks": {}}


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Ready: database and Kafka reachable")
async def readyz(resources: ResourcesDep):
    checks = {}
    try:
        await asyncio.wait_for(resources.pool.fetchval("SELECT 1"), 2)
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unavailable: {error!r}"
    try:
        await resources.publisher.ping()
        checks["kafka"] = "ok"
    except KafkaUnavailable as error:
        checks["kafka"] = f"unavailable: {error}"
    ready = all(value == "ok" for value in checks.values())
    checks.update(resources.reads.describe())  # shown, not required: reads fall back to the primary
    if resources.keys.enabled:  # shown, not required: the keys before the failed change stay in force
        error = resources.keys.reload_error
        checks["api_keys"] = "ok" if error is None else f"the last change of the file was not taken: {error}"
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={401: {"model": Problem}},
            summary="Prometheus metrics (with METRICS_REQUIRE_KEY, for any valid API key)")
async def metrics(request: Request, resources: ResourcesDep) -> Response:
    # The header is read here rather than declared: /metrics is open unless METRICS_REQUIRE_KEY says so.
    if resources.api.metrics_require_key:
        token = bearer_token(request.headers.get("authorization"))
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token) if token else None
        authenticate(resources.keys, credentials, scope=None)
    if resources.api.prometheus_multiproc_dir:  # several workers: add up every process's values
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
