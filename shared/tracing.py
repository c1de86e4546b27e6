"""OpenTelemetry tracing, configured only by the standard OTEL_* variables (README: "Tracing").

Off unless the environment asks for an exporter (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER other than none) and OTEL_SDK_DISABLED
is not true. Off, nothing is installed: no exporter, no instrumentation, and the services' own
spans are skipped behind one flag, so the hot paths pay nothing measurable. On:

- the maintained instrumentations where they fit: asyncpg (every query), aiokafka's producer
  (a send span, and W3C trace context injected into the record's headers), the ASGI middleware
  around the whole API (the hot read included, which runs before FastAPI's stack);
- not aiokafka's consumer side: it makes a span per record inside getmany, which does not fit a
  consumer that applies a partition's records in one transaction. The consumer makes its own
  spans (services/command_consumer/pipeline.py): one per batch, and one per command in the
  command's own trace;
- the sampler, service name and exporter settings are the SDK's own (OTEL_TRACES_SAMPLER,
  OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_*).
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter

ENABLED = False  # whether spans are made; read on the hot paths, so a plain module global
_instrumented = False


def wanted_by_environment(environ=os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return exporter not in ("", "none") or bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(service: str) -> bool:
    """What every entrypoint calls: tracing on when the environment asks for it."""
    if not wanted_by_environment():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"segmentation-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    enable(provider)
    return True


def _exporter():
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* (http/protobuf)


def enable(provider) -> None:
    """Spans on, recorded by `provider` (the global one; tests pass one with an in-memory exporter)."""
    global ENABLED, _instrumented
    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)
    if not _instrumented:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
        from opentelemetry.instrumentation.utils import unwrap

        AsyncPGInstrumentor().instrument()
        AIOKafkaInstrumentor().instrument()
        import aiokafka

        # A span per record inside getmany does not fit the batch consumer: it makes its own.
        unwrap(aiokafka.AIOKafkaConsumer, "getmany")
        unwrap(aiokafka.AIOKafkaConsumer, "getone")
        _instrumented = True
    ENABLED = True


def disable() -> None:
    """Spans off again and the instrumentations removed (tests)."""
    global ENABLED, _instrumented
    if _instrumented:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().uninstrument()
        AIOKafkaInstrumentor().uninstrument()  # unwrapping what is no longer wrapped is a no-op
        _instrumented = False
    ENABLED = False


def tracer():
    return trace.get_tracer("segmentation")


def add_trace_ids(logger, method_name, event_dict):
    """structlog processor: the current span's trace and span ids on every line written inside one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class _PairsGetter(Getter):
    """Trace context in headers given as (name, value) pairs: Kafka's (str, bytes) and ASGI's
    (bytes, bytes) alike."""

    def get(self, carrier, key: str):
        names = (key, key.encode())
        values = [value.decode("latin-1") for name, value in carrier if name in names and value is not None]
        return values or None

    def keys(self, carrier):
        return [name.decode("latin-1") if isinstance(name, bytes) else name for name, _ in carrier]


HEADER_PAIRS = _PairsGetter()
