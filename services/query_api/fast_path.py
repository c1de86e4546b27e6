"""The hot read, GET /users/{user_id}/segments, answered before Starlette's middleware stack,
FastAPI's routing and its dependency machinery (SegmentationAPI.__call__ asks here first). Only
well-formed requests take this path; anything else (a bad id that deserves a 422, another method)
goes on to the FastAPI route, which gives the same answer more slowly. It records its own request
metrics; an exception reaches the server, which answers 500."""

from __future__ import annotations

import time

from services.query_api import http_metrics
from services.query_api.auth import KeyRing, bearer_token
from services.query_api.parameters import USER_SEGMENTS_PATH, user_id_from_path
from services.query_api.readmodel import user_segments_json

HEADERS = [(b"content-type", b"application/json")]


async def answer_user_segments(resources, scope, send) -> bool:
    """Answers the request and returns True if it is a well-formed GET of a user's segments."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return False
    user_id = user_id_from_path(scope["path"])
    if user_id is None or (resources.keys.enabled and not _may_read(resources.keys, scope["headers"])):
        return False  # the route answers, with the 401 or 403 it deserves
    started = time.perf_counter()
    status = 500
    try:
        body = await user_segments_json(resources.memberships, resources.rollout.segments, user_id)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        status = 200
    finally:
        http_metrics.record(USER_SEGMENTS_PATH, "GET", status, time.perf_counter() - started)
    return True


def _may_read(keys: KeyRing, headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"authorization":
            token = bearer_token(value.decode("latin-1"))
            key = keys.verify(token) if token else None
            return key is not None and "read" in key.scopes
    return False
