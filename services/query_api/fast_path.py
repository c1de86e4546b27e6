"""The hot read, GET /users/{user_id}/segments, answered before Starlette's middleware stack,
FastAPI's routing and its dependency machinery (SegmentationAPI.__call__ asks here first). Only
well-formed requests take this path (the consistency token, if any, in its header); anything else
(a bad id or token that deserves a 422, a missing key, a query string, another method) goes on to
the FastAPI route, which gives the same answer more slowly. It records its own request
metrics; an exception reaches the server, which answers 500."""

from __future__ import annotations

import time

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from services.query_api import http_metrics, user_segments
from services.query_api.auth import KeyRing, authorize, bearer_token
from services.query_api.parameters import USER_SEGMENTS_PATH, user_id_from_path
from services.query_api.replicas import InvalidToken, parse_token
from shared import tracing

SPAN_NAME = f"GET {USER_SEGMENTS_PATH}"
SERVER = SpanKind.SERVER  # read once: an enum member's look-up is not free
SPAN_ATTRIBUTES = {"http.request.method": "GET", "http.route": USER_SEGMENTS_PATH}


async def answer_user_segments(resources, scope, send) -> bool:
    """Answers the request and returns True if it is a well-formed GET of a user's segments."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope["query_string"]:
        return False
    user_id = user_id_from_path(scope["path"])
    if user_id is None:
        return False
    authorization = consistency = traceparent = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"x-consistency-token":
            consistency = value
        elif name == b"traceparent":
            traceparent = value
    if resources.keys.enabled and not _may_read(resources.keys, authorization):
        return False  # the route answers, with the 401 or 403 it deserves
    try:
        token = parse_token(consistency.decode("latin-1")) if consistency is not None else None
    except InvalidToken:
        return False  # the route answers 422
    span = _request_span(scope, traceparent) if tracing.ENABLED and not (
        traceparent is not None and tracing.declined_by(traceparent)) else None
    if span is None:
        await _answer(resources, user_id, token, send)
    else:
        with trace.use_span(span, end_on_exit=True):
            span.set_attribute("http.response.status_code", await _answer(resources, user_id, token, send))
    return True


def _request_span(scope, traceparent: bytes | None) -> trace.Span | None:
    """The hot read's server span, made here, and only for a request its sampler samples: a
    middleware's span, or one the SDK makes only to drop it, would cost a large part of the read
    itself (`python -m bench.read_throughput` measures the read with tracing on and off). Nothing
    is built before the sampler has said yes."""
    parent = propagate.extract(scope["headers"], getter=tracing.HEADER_PAIRS) if traceparent is not None else None
    span = tracing.start_span_if_sampled(SPAN_NAME, parent, SERVER, SPAN_ATTRIBUTES)
    if span is not None:
        span.set_attribute("url.path", scope["path"])
    return span


async def _answer(resources, user_id: int, token: int | None, send) -> int:
    started = time.perf_counter()
    status = 500
    try:
        status, body, headers = await user_segments.answer(resources, user_id, token)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    finally:
        http_metrics.record(USER_SEGMENTS_PATH, "GET", status, time.perf_counter() - started)
    return status


def _may_read(keys: KeyRing, authorization: bytes | None) -> bool:
    token = bearer_token(authorization.decode("latin-1")) if authorization else None
    return authorize(keys.verify(token) if token else None, "read") is None
