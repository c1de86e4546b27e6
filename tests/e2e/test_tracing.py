"""Tracing is configured by the standard OTEL_* variables alone: the services as processes export
spans over OTLP to a receiver when OTEL_EXPORTER_OTLP_ENDPOINT names it, and send nothing at all
when the variables are absent (off by default)."""

from __future__ import annotations

import time

import httpx
import pytest

from devstack.otlp_sink import OtlpSink
from tests.e2e.conftest import started_stack

pytestmark = pytest.mark.e2e


def drive(stack) -> None:
    """A command through the gateway, awaited, then a hot read."""
    with httpx.Client(base_url=stack.api_url(), timeout=10) as http:
        assert http.post("/commands", json={"type": "create_segment", "slug": "OTEL", "percent": 50,
                                            "command_id": "otel"}).status_code == 202
        deadline = time.monotonic() + 30
        while http.get("/commands/otel").status_code != 200:
            assert time.monotonic() < deadline, "no outcome"
            time.sleep(0.05)
        assert http.get("/users/1/segments").status_code == 200


def test_otel_variables_turn_tracing_on_and_their_absence_leaves_it_off(settings, tmp_path):
    with OtlpSink() as sink:
        for stack in started_stack(settings, tmp_path / "off"):  # OTEL_* unset: nothing may be sent
            drive(stack)
            time.sleep(1.0)
        assert sink.spans == {}

        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        wanted = {("segmentation-query_api", "POST /commands"),
                  ("segmentation-query_api", "GET /users/{user_id}/segments"),
                  ("segmentation-command_consumer", "apply create_segment")}
        for stack in started_stack(settings, tmp_path / "on", **env):
            drive(stack)
            deadline = time.monotonic() + 20  # each exports every 100 ms
            while not wanted <= set(sink.spans):
                assert time.monotonic() < deadline, f"spans so far: {dict(sink.spans)}"
                time.sleep(0.1)
