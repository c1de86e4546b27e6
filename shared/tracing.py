"""OpenTelemetry tracing, configured only by the standard OTEL_* variables (README: "Tracing").

Off unless the environment asks for an exporter (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER other than none) and OTEL_SDK_DISABLED
is not true. Off, nothing is installed: no exporter, no instrumentation, and the services' own
spans are skipped behind one flag, so the hot paths pay nothing measurable. On:

- the maintained instrumentations where they fit: asyncpg (every query), aiokafka's producer
  (a send span, and W3C trace context injected into the record's headers), and FastAPI's own
  request spans (one server span a request, named by its route). The hot read, which runs before
  FastAPI's stack, makes its own server span (services/query_api/fast_path.py), and the consumer
  sends outcomes past the producer's instrumentation with its command spans' context
  (services/command_consumer/publishing.py);
- spans made only once the sampler has said yes (SampledFirst, below), so unsampled work builds
  nothing;
- no secret in any span: RedactSecrets rewrites URL attributes as a span starts;
- not aiokafka's consumer side: it makes a span per record inside getmany, which does not fit a
  consumer that applies a partition's records in one transaction. The consumer makes its own
  spans (services/command_consumer/pipeline.py): one per batch, and one per command in the
  command's own trace;
- the sampler, service name and exporter settings are the SDK's own (OTEL_TRACES_SAMPLER,
  OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_*).
"""

from __future__ import annotations

import copy
import re
from random import getrandbits as _random_bits
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from opentelemetry import context, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import SpanProcessor

from shared.settings import TracingSettings

ENABLED = False  # whether spans are made; read on the hot paths, so a plain module global
_instrumented: set[str] = set()  # the instrumentations installed
_sampled_first = None  # the SampledFirst of the enabled provider


def configure(service: str) -> bool:
    """What every entrypoint calls: tracing on when the environment asks for it (TracingSettings)."""
    environment = TracingSettings()
    if not environment.wanted:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if environment.otel_service_name else {SERVICE_NAME: f"segmentation-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(_exporter(environment)))
    enable(provider)
    return True


def _exporter(environment: TracingSettings):
    if (environment.otel_traces_exporter or "otlp").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* (http/protobuf)


def skipped(name: str) -> bool:
    """Whether OTEL_PYTHON_DISABLED_INSTRUMENTATIONS (comma-separated, as for opentelemetry-instrument)
    names this instrumentation: asyncpg, aiokafka, or fastapi / asgi (the API's request spans)."""
    return TracingSettings().skipped(name)


def enable(provider) -> None:
    """Spans on, recorded by `provider` (the global one; tests pass one with an in-memory exporter),
    with the instrumentations OTEL_PYTHON_DISABLED_INSTRUMENTATIONS does not name."""
    global ENABLED, _sampled_first
    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)
    if hasattr(provider, "add_span_processor") and not getattr(provider, "_secrets_redacted", False):
        provider.add_span_processor(RedactSecrets())
        provider._secrets_redacted = True
    if "asyncpg" not in _instrumented and not skipped("asyncpg"):
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument()
        _instrumented.add("asyncpg")
    if "aiokafka" not in _instrumented and not skipped("aiokafka"):
        import aiokafka
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
        from opentelemetry.instrumentation.utils import unwrap

        AIOKafkaInstrumentor().instrument()
        # A span per record inside getmany does not fit the batch consumer: it makes its own.
        unwrap(aiokafka.AIOKafkaConsumer, "getmany")
        unwrap(aiokafka.AIOKafkaConsumer, "getone")
        _instrumented.add("aiokafka")
    _sampled_first = SampledFirst(tracer())
    ENABLED = True


def disable() -> None:
    """Spans off again and the instrumentations removed (tests)."""
    global ENABLED
    if "asyncpg" in _instrumented:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().uninstrument()
    if "aiokafka" in _instrumented:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor

        AIOKafkaInstrumentor().uninstrument()  # unwrapping what is no longer wrapped is a no-op
    _instrumented.clear()
    ENABLED = False


def tracer():
    return trace.get_tracer("segmentation")


def unwrapped(function):
    """`function` as its library defines it, past an instrumentation's wrapper if it has one
    (wrapt, which every OpenTelemetry instrumentation uses, keeps the original as __wrapped__)."""
    return getattr(function, "__wrapped__", function)


def start_span_if_sampled(name: str, parent: context.Context | None = None, kind=trace.SpanKind.INTERNAL,
                          attributes=None, links=(), start_time: int | None = None) -> trace.Span | None:
    """A started span if the configured sampler samples it, else None, having made nothing
    (see SampledFirst). `parent` None: a new trace. Tracing must be on."""
    return _sampled_first.start_span(name, parent, kind, attributes, links, start_time)


def declined_by(traceparent: bytes) -> bool:
    """True when a span whose parent is this `traceparent` header is certain not to be sampled
    (see SampledFirst.declined_by): no need to extract the context. Tracing must be on."""
    return _sampled_first.declined_by(traceparent)


class SampledFirst:
    """Asks the configured sampler first, and makes a span only for a yes.

    The SDK makes its sampler's decision inside start_span, after the span's context, a
    NonRecordingSpan and the current-context bookkeeping are built, even when nothing is
    recorded (bench.read_throughput measures the hot read with tracing on). Here the same sampler
    (OTEL_TRACES_SAMPLER: parent-based, ratio, custom) is asked with the trace id the span
    would get, and only a sampled span is started, by a copy of the tracer told the decision and
    the trace id, so sampled spans are exactly what the SDK itself would have made.
    """

    def __init__(self, sdk_tracer) -> None:
        from opentelemetry.sdk.trace import RandomIdGenerator, Tracer

        self._tracer = sdk_tracer
        self._decided = None
        if isinstance(sdk_tracer, Tracer):
            self._sampler = sdk_tracer.sampler
            self._ids = sdk_tracer.id_generator
            self._decision = _Decided()
            self._trace_id = _PresetTraceId(sdk_tracer.id_generator)
            self._decided = copy.copy(sdk_tracer)
            self._decided.sampler = self._decision
            self._decided.id_generator = self._trace_id
        self._follows_remote_flag = _follows_remote_flag(getattr(sdk_tracer, "sampler", None))
        self._root_bound = _root_ratio_bound(getattr(sdk_tracer, "sampler", None))
        # A new trace's id drawn half first, when the ids are the SDK's random ones and a ratio
        # decides new traces: the ratio reads only the low 64 bits, so most answers are no before
        # the rest is drawn.
        self._draws_roots = (self._decided is not None and self._root_bound is not None
                             and type(self._ids) is RandomIdGenerator)

    def declined_by(self, traceparent: bytes) -> bool:
        """Whether a child of this W3C `traceparent` is certain not to be sampled, read from its
        flags alone: true only under a parent-based sampler with the standard remote-parent
        rules (every OTEL_TRACES_SAMPLER=parentbased_*), which samples a remote parent's child
        exactly when the parent's sampled flag is set. Extracting a context costs a good part of a
        command's own processing; from a producer that samples few, most are declined here from
        two characters of the header."""
        return (self._follows_remote_flag and len(traceparent) >= 55 and traceparent[52:53] == b"-"
                and not int(traceparent[53:55], 16) & 1)

    def start_span(self, name: str, parent: context.Context | None = None, kind=trace.SpanKind.INTERNAL,
                   attributes=None, links=(), start_time: int | None = None) -> trace.Span | None:
        if parent is None and self._draws_roots:  # the hot read's usual case: keep it short
            low = _random_bits(64)
            if low >= self._root_bound:
                return None  # the ratio sampler's own rule, before anything is built
            trace_id = _random_bits(64) << 64 | low or 1  # never the invalid id 0
            return self._started(name, _NEW_TRACE, trace_id, kind, attributes, links, start_time)
        if self._decided is None:  # not the SDK's tracer: let it decide as it always does
            span = self._tracer.start_span(name, parent or _NEW_TRACE, kind, attributes, links, start_time)
            return span if span.is_recording() else None
        parent_context = trace.get_current_span(parent).get_span_context() if parent is not None else None
        if parent_context is not None and parent_context.is_valid:
            trace_id = parent_context.trace_id
        else:
            parent = _NEW_TRACE
            trace_id = self._ids.generate_trace_id()
            if self._root_bound is not None and trace_id & _RATIO_MASK >= self._root_bound:
                return None  # the ratio sampler's own rule, without building its answer
        return self._started(name, parent, trace_id, kind, attributes, links, start_time)

    def _started(self, name, parent, trace_id, kind, attributes, links, start_time) -> trace.Span | None:
        """The span the SDK makes for `trace_id` if the sampler samples it, else None."""
        result = self._sampler.should_sample(parent, trace_id, name, kind, attributes, links)
        if not result.decision.is_recording():
            return None
        self._decision.result, self._trace_id.trace_id = result, trace_id  # read at once by start_span
        span = self._decided.start_span(name, parent, kind, attributes, links, start_time)
        return span if span.is_recording() else None  # a tracer its provider's configuration turned off


_NEW_TRACE = context.Context()
_RATIO_MASK = (1 << 64) - 1  # TraceIdRatioBased samples a trace when its id's low 64 bits are under its bound


def _root_ratio_bound(sampler) -> int | None:
    """The bound of the ratio sampler that decides new traces (traceidratio, parentbased_traceidratio)."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    root = getattr(sampler, "_root", None) if isinstance(sampler, ParentBased) else sampler
    return root.bound if isinstance(root, TraceIdRatioBased) and root.TRACE_ID_LIMIT == _RATIO_MASK else None


def _follows_remote_flag(sampler) -> bool:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    return (isinstance(sampler, ParentBased) and getattr(sampler, "_remote_parent_sampled", None) is ALWAYS_ON
            and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF)


class _Decided:
    """A sampler that answers with the decision SampledFirst already has."""

    result = None

    def should_sample(self, *args, **kwargs):
        return self.result

    def get_description(self) -> str:
        return "decided by SampledFirst"


class _PresetTraceId:
    """The trace id SampledFirst asked its sampler about; span ids as the SDK makes them."""

    def __init__(self, ids) -> None:
        self._ids = ids
        self.trace_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self._ids.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return self._ids.is_trace_id_random()


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


# Whoever reads traces must not be able to use what they read: a report link's token is the report,
# an import's token names its commands. Such values leave a span's attributes before it is exported.
SECRET_PARAMETERS = frozenset({"token", "api_key", "key", "access_token"})
SECRET_PATH = re.compile(r"^(/ui/import/)(?!publish$)[^/]+")
URL_ATTRIBUTES = ("url.path", "url.query", "url.full", "http.url", "http.target")


def redacted(name: str, value: str, path: str = "") -> str:
    """`value` of the URL attribute `name` with its secrets replaced; `path` is the request's path.
    Console pages keep no query string at all: theirs is form input."""
    if name == "url.query":
        return "" if path.startswith("/ui") else _redacted_query(value)
    if name == "url.path":
        return SECRET_PATH.sub(r"\1{token}", value)
    split = urlsplit(value)  # a full URL or a target: keep its parts, clean its path and query
    clean_path = SECRET_PATH.sub(r"\1{token}", split.path)
    query = "" if clean_path.startswith("/ui") else _redacted_query(split.query)
    return urlunsplit((split.scheme, split.netloc, clean_path, query, ""))


def _redacted_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(key, "REDACTED" if key.lower() in SECRET_PARAMETERS else value) for key, value in pairs])


class RedactSecrets(SpanProcessor):
    """Rewrites a span's URL attributes as it starts (request spans carry them from the start)."""

    def on_start(self, span, parent_context=None) -> None:
        attributes = span.attributes or {}
        path = attributes.get("url.path")
        path = path if isinstance(path, str) else ""
        for name in URL_ATTRIBUTES:
            value = attributes.get(name)
            if isinstance(value, str) and (cleaned := redacted(name, value, path)) != value:
                span.set_attribute(name, cleaned)
