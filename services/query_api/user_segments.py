"""The answer to GET /users/{user_id}/segments, one function for both of its entrances: the fast
path (fast_path.py), which answers well-formed requests before Starlette's stack, and the FastAPI
route (routes/users.py), which answers the rest and documents the endpoint."""

from __future__ import annotations

import orjson

from services.query_api.readmodel import user_segments_json
from services.query_api.schemas import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from shared.db import TRANSIENT_DB_ERRORS

Headers = list[tuple[bytes, bytes]]
JSON: Headers = [(b"content-type", b"application/json")]
UNAVAILABLE = orjson.dumps({"detail": DATABASE_UNAVAILABLE})
UNAVAILABLE_HEADERS: Headers = [*JSON, (b"retry-after", RETRY_AFTER_SECONDS.encode()),
                                (b"content-length", str(len(UNAVAILABLE)).encode())]


async def answer(resources, user_id: int, token: int | None) -> tuple[int, bytes, Headers]:
    """Status, body and headers: the user's segments (from a server that has replayed `token`, if
    given), or a 503 the client may retry when no server that may answer can be reached."""
    try:
        found = await resources.reads.memberships(user_id, token)
        body = await user_segments_json(found, resources.rollout, user_id)
    except TRANSIENT_DB_ERRORS:
        return 503, UNAVAILABLE, UNAVAILABLE_HEADERS
    return 200, body, [*JSON, (b"content-length", str(len(body)).encode())]
