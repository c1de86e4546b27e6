"""SampledFirst: the configured sampler asked before any span work, and the spans it lets through
exactly those the SDK would have made (trace id by the ratio rule, parent, attributes)."""

from __future__ import annotations

import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, ParentBasedTraceIdRatio, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from shared.tracing import SampledFirst, unwrapped

RATIO_MASK = (1 << 64) - 1


def recorded(sampler):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SampledFirst(provider.get_tracer("test")), exporter


def remote_parent(sampled: bool):
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    parent = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


@pytest.mark.parametrize("sampler", [TraceIdRatioBased(0.25), ParentBasedTraceIdRatio(0.25)],
                         ids=["ratio", "parent-based"])
def test_a_ratio_sampler_decides_on_the_trace_id_the_span_then_gets(sampler):
    ratio = TraceIdRatioBased(0.25)
    early, exporter = recorded(sampler)
    started = [early.start_span("read", kind=SpanKind.SERVER, attributes={"n": i}) for i in range(4000)]
    kept = [span for span in started if span is not None]
    for span in kept:
        span.end()
    finished = exporter.get_finished_spans()
    assert 800 < len(kept) < 1200  # about a quarter
    assert len(finished) == len(kept)
    # The SDK's rule for a ratio: a trace is sampled when its id's low 64 bits are under the bound.
    # A span started with a trace id other than the one the sampler was asked about breaks it.
    assert all(span.context.trace_id & RATIO_MASK < ratio.bound for span in finished)
    assert all(span.kind is SpanKind.SERVER and span.parent is None for span in finished)
    assert {span.attributes["n"] for span in finished} == {span.attributes["n"] for span in kept}


def test_a_parent_based_sampler_follows_the_remote_parent_and_nothing_is_made_for_a_no():
    early, exporter = recorded(ParentBased(ALWAYS_OFF))
    assert early.start_span("read") is None  # a new trace, its root sampler says no
    assert early.start_span("read", remote_parent(sampled=False)) is None
    span = early.start_span("read", remote_parent(sampled=True))
    span.end()
    [finished] = exporter.get_finished_spans()
    assert finished.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert finished.parent.span_id == 0x00F067AA0BA902B7
    assert finished.context.trace_flags.sampled


def test_a_tracer_not_of_the_sdk_is_left_to_decide_as_it_does():
    early = SampledFirst(trace.NoOpTracer())
    assert early.start_span("read", remote_parent(sampled=True)) is None  # nothing it makes records


class CountingIds(IdGenerator):
    """Trace ids 1, 2, 3, …: not the SDK's random ones."""

    def __init__(self) -> None:
        self.issued = 0

    def generate_span_id(self) -> int:
        return 0xABC

    def generate_trace_id(self) -> int:
        self.issued += 1
        return self.issued


def test_ids_not_the_sdks_random_ones_are_drawn_by_their_generator():
    """A new trace's id is drawn in two halves only from the SDK's random generator; any other
    generator (AWS X-Ray's, say) gives the id, and the ratio decides on it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.25), id_generator=CountingIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    early = SampledFirst(provider.get_tracer("test"))
    kept = [early.start_span("read") for _ in range(3)]
    for span in kept:
        span.end()  # ids 1, 2, 3: each far under a quarter of 2**64, so all sampled
    assert [span.context.trace_id for span in exporter.get_finished_spans()] == [1, 2, 3]


def test_unwrapped_is_what_an_instrumentation_wrapped():
    def original():
        return "original"

    wrapper = wrapt.FunctionWrapper(original, lambda wrapped, instance, args, kwargs: "wrapped")
    assert wrapper() == "wrapped"
    assert unwrapped(wrapper) is original
    assert unwrapped(original) is original
