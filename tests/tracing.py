"""Spans recorded in memory for a test. One provider for the whole session: OpenTelemetry lets the
global tracer provider be set once, and FastAPI's request spans go to the global one."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans():
    """Tracing on, into the in-memory exporter, for one test."""
    EXPORTER.clear()
    tracing.enable(PROVIDER)
    try:
        yield EXPORTER
    finally:
        tracing.disable()
        EXPORTER.clear()
