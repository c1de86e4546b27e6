"""Hostile HTTP against the real server (uvicorn): bodies over the limit however they are sent,
report links that try to name files or other hosts, and paths that try to escape."""

from __future__ import annotations

import http.client
from urllib.parse import quote, urlsplit

import httpx
import pytest

from devstack.processes import free_port
from devstack.stack import Stack

pytestmark = pytest.mark.e2e
LIMIT = 1024 * 1024


def raw_request(stack, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """The request line exactly as given: no client normalises `..` or re-encodes anything."""
    connection = http.client.HTTPConnection(stack.settings.api_host, stack.settings.api_port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        if body is not None:
            connection.send(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def command_of_size(size: int) -> bytes:
    head, tail = b'{"type": "create_user", "user_id": 1, "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_bodies_over_the_limit_get_413_whether_declared_or_streamed(stack):
    with httpx.Client(base_url=stack.api_url(), timeout=30) as http:
        assert http.post("/commands", content=command_of_size(LIMIT),
                         headers={"content-type": "application/json"}).status_code == 202  # at the limit
        declared = http.post("/commands", content=command_of_size(LIMIT + 1),
                             headers={"content-type": "application/json"})
        assert declared.status_code == 413 and f"{LIMIT}-byte limit" in declared.json()["detail"]

    def chunks(total: int, size: int = 64 * 1024):  # chunked transfer: no Content-Length to go by
        body = command_of_size(total)
        for start in range(0, len(body), size):
            yield body[start:start + size]

    with httpx.Client(base_url=stack.api_url(), timeout=30) as http:
        streamed = http.post("/commands", content=chunks(4 * LIMIT), headers={"content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert http.post("/commands", content=chunks(2000), headers={"content-type": "application/json"}
                         ).status_code == 202
        assert http.get("/healthz").status_code == 200  # and the server is fine


FILE_TOKENS = ["../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "file:///etc/passwd",
               "%00", "....//....//etc/passwd", "C:\\Windows\\win.ini", "x" * 2048]


def test_report_links_cannot_name_a_file(stack):
    for token in FILE_TOKENS:
        status, body = raw_request(stack, "GET", f"/reports/download?token={token}")
        assert status == 403, (token, status, body[:200])
        assert b"root:" not in body and b"[fonts]" not in body


def test_report_paths_that_try_to_escape_get_nothing(stack):
    with httpx.Client(base_url=stack.api_url()) as http:
        response = http.get("/reports/history", params={"year": 2026, "month": 11})
    assert response.status_code == 200, response.text
    token = urlsplit(response.json()["report_link"]).query.removeprefix("token=")
    status, body = raw_request(stack, "GET", f"/reports/download?token={token}")  # the real link works
    assert (status, body[:57]) == (200, b"user_id,segment_slug,operation,executed_at,source,reason\n"), body[:300]
    for target in (f"/reports/download/../../../../etc/passwd?token={token}",
                   f"/reports/download/%2e%2e/%2e%2e/etc/passwd?token={token}",
                   f"/reports/../../etc/passwd?token={token}",
                   f"//etc/passwd?token={token}",
                   f"/reports/download/evil.csv?token={token}"):
        status, body = raw_request(stack, "GET", target)
        assert status in (400, 404), (target, status, body[:300])
        assert b"root:" not in body
    status, body = raw_request(stack, "GET", "/reports/download?token=" + quote(token + "/../x", safe=""))
    assert status == 403, body[:300]  # a valid token with anything appended is no longer valid
    assert raw_request(stack, "GET", "/reports/download?token=" + "x" * 2049)[0] == 422  # too long to read


def test_with_a_public_url_a_forged_host_header_cannot_move_report_links(settings, tmp_path):
    settings = settings.model_copy(update={"api_port": free_port(), "data_dir": tmp_path,
                                           "api_public_url": "https://segments.example.com",
                                           "consumer_metrics_port": 0, "expiry_metrics_port": 0,
                                           "publisher_metrics_port": 0})
    stack = Stack(settings, say=lambda *_: None)
    stack.env.update({key.upper(): str(value) for key, value in settings.model_dump().items()
                      if value is not None and key != "data_dir"})
    try:
        stack.start_servers()
        stack.prepare()
        stack.start_service("query_api")
        stack.wait_ready()
        status, body = raw_request(stack, "GET", "/reports/history?year=2026&month=11",
                                   headers={"Host": "evil.example.net"})
        assert status == 200
        assert httpx.Response(200, content=body).json()["report_link"].startswith(
            "https://segments.example.com/reports/download?token=")
    finally:
        stack.close()
