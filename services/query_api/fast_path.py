"""The hot read, GET /users/{user_id}/segments, answered before FastAPI's routing and dependency
machinery. Only well-formed requests take this path; anything else (a bad id that deserves a 422,
another method) goes on to the FastAPI route, which gives the same answer more slowly."""

from __future__ import annotations

import re
from types import SimpleNamespace

from services.query_api.readmodel import user_segments_json
from shared.commands import MAX_USER_ID

PATH = re.compile(r"/users/([1-9][0-9]{0,18})/segments")
ROUTE = SimpleNamespace(path="/users/{user_id}/segments")  # the template metrics are labelled with
HEADERS = [(b"content-type", b"application/json")]


class UserSegmentsFastPath:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            match = PATH.fullmatch(scope["path"])
            if match and int(match.group(1)) <= MAX_USER_ID:
                resources = scope["app"].state.resources
                body = await user_segments_json(resources.pool, resources.rollout.segments, int(match.group(1)))
                scope["route"] = ROUTE
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
