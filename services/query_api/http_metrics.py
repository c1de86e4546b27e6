"""Request metrics by route template, method and status, and a body-size limit, as plain ASGI middleware."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

REQUESTS = Counter("segmentation_http_requests_total", "HTTP requests by route template, method and status",
                   ["route", "method", "status"])
LATENCY = Histogram("segmentation_http_request_seconds", "HTTP request latency by route template",
                    ["route", "method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

UNCOUNTED = frozenset({"/metrics"})
BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


_children: dict[tuple, tuple] = {}


def record(template: str, method: str, status: int, seconds: float) -> None:
    key = (template, method, status)
    children = _children.get(key)
    if children is None:  # label lookups take a lock; do them once per combination
        children = _children[key] = (REQUESTS.labels(template, method, str(status)), LATENCY.labels(template, method))
    children[0].inc()
    children[1].observe(seconds)


class MetricsMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNCOUNTED:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record(getattr(scope.get("route"), "path", "unmatched"), scope["method"], status,
                   time.perf_counter() - started)


class BodySizeLimitMiddleware:
    """413 for a body over the limit, by Content-Length or by counting a streamed body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in BODILESS:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        body = f'{{"detail":"request body is over the {self.max_bytes}-byte limit"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
