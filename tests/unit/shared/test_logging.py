"""Every line a service writes is one JSON object naming the service, library records included."""

from __future__ import annotations

import subprocess
import sys

import orjson

PROGRAM = """
import logging, structlog
from shared.logging import configure_logging
configure_logging("INFO", "json", service="command_consumer")
structlog.get_logger("x").info("command rejected", command_id="c-1", traceparent="00-ab-cd-01")
structlog.get_logger("x").debug("hidden at INFO")
logging.getLogger("aiokafka.consumer").warning("heartbeat failed for %s", "group-1")
logging.getLogger("aiokafka.consumer").info("below the library threshold")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("uvicorn.error").exception("boom")
"""


def test_structlog_and_library_records_are_json_lines_with_the_service():
    completed = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    lines = [orjson.loads(line) for line in completed.stderr.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["command rejected", "heartbeat failed for group-1", "boom"]
    assert all(line["service"] == "command_consumer" and line["timestamp"].endswith("Z") for line in lines)
    assert lines[0]["command_id"] == "c-1" and lines[0]["traceparent"] == "00-ab-cd-01"
    assert (lines[1]["level"], lines[1]["logger"]) == ("warning", "aiokafka.consumer")
    assert "ZeroDivisionError" in lines[2]["exception"]
