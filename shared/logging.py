"""Structured logs: JSON lines by default, one event per line, with bound context. Records from
libraries (aiokafka, uvicorn, asyncpg) go through the same renderer, so every line of a service's
output is one JSON object carrying the service's name."""

from __future__ import annotations

import logging
import sys

import structlog

from shared.tracing import add_trace_ids


def configure_logging(level: str = "INFO", fmt: str = "json", service: str | None = None) -> None:
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()

    def add_service(logger, method_name, event_dict):
        if service:
            event_dict.setdefault("service", service)
        return event_dict

    processors = [
        structlog.contextvars.merge_contextvars,
        add_service,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: same processors and renderer, warnings and up.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *processors]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
