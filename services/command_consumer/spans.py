"""The consumer's spans, when tracing is on (README: "Tracing"). One transaction applies many
commands, so the model follows OpenTelemetry's messaging conventions for batches:

- a span per batch ("process <topic>"), with a link to each command's context, parenting the
  database work of the batch (asyncpg's spans) and, when the batch holds a single command, a
  child of that command's context, so a lone command's trace shows its database work too;
- a short span per sampled command ("apply <type>") in its producer's trace, parented by the
  context its record carried (by the batch span when it carried none, and then sampled with the
  batch), from the batch's start until its outcome is durable, with the command id, its offset,
  how long it waited in Kafka, its status and error code, and a link to the batch span; a
  rejected or invalid command's span has status ERROR and says why. Its outcome record carries
  the span's context on.

Every span is made only once the sampler has said yes (shared.tracing.SampledFirst): a batch
that is not sampled, and a command that is not, cost a header look-up each and make nothing.
"""

from __future__ import annotations

import contextlib
import time

from aiokafka import TopicPartition
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.command_consumer.batch import Processed
from services.command_consumer.observers import BatchResult
from services.command_consumer.parsing import InvalidRecord, ParsedRecord
from shared.tracing import HEADER_PAIRS, declined_by, start_span_if_sampled


class BatchTrace:
    def __init__(self, partitions: list[TopicPartition], batch: list[ParsedRecord]) -> None:
        """`partitions`: those of one topic the batch holds records of (one, unless several were
        fetched together while the load was light)."""
        self._batch = batch
        self._traceparents = [parsed.record.header("traceparent") for parsed in batch]
        self._contexts: dict[int, context.Context] = {}
        self.started_ns = time.time_ns()
        topic = partitions[0].topic
        attributes = {"messaging.system": "kafka", "messaging.operation.type": "process",
                      "messaging.destination.name": topic, "messaging.batch.message_count": len(batch)}
        if len(partitions) == 1:
            attributes["messaging.destination.partition.id"] = str(partitions[0].partition)
        else:
            attributes["segmentation.kafka.partitions"] = [tp.partition for tp in partitions]
        self.span = start_span_if_sampled(
            f"process {topic}", self._context(0) if len(batch) == 1 and self._traceparents[0] else None,
            kind=SpanKind.CONSUMER, start_time=self.started_ns, attributes=attributes)
        if self.span is not None:
            for index, traceparent in enumerate(self._traceparents):
                if traceparent is not None:
                    self.span.add_link(trace.get_current_span(self._context(index)).get_span_context())
        self._token = None

    @property
    def recording(self) -> bool:
        return self.span is not None

    def _context(self, index: int) -> context.Context:
        """The trace context record `index` carried (extracted once, and only when asked)."""
        extracted = self._contexts.get(index)
        if extracted is None:
            extracted = self._contexts[index] = propagate.extract(self._batch[index].record.headers,
                                                                  getter=HEADER_PAIRS)
        return extracted

    def __enter__(self) -> BatchTrace:
        if self.span is not None:
            self._token = context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self.span is None:
            return
        context.detach(self._token)
        if error is not None:  # the batch failed: nothing of it was committed
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
            self.span.end()

    def command_spans(self, processed: list[Processed]) -> list[trace.Span | None] | None:
        """A span per sampled command (None for the others, and None for the whole batch when no
        command is sampled): a command whose record carried a context is in that context's trace,
        sampled as the sampler decides for it; one that carried none is traced when its batch is,
        in the batch's trace."""
        batch_links = [Link(self.span.get_span_context())] if self.span is not None else ()
        batch_context = trace.set_span_in_context(self.span) if self.span is not None else None
        spans: list[trace.Span | None] = []
        for index, (item, traceparent) in enumerate(zip(processed, self._traceparents, strict=True)):
            if traceparent is None:
                parent = batch_context
            else:
                parent = None if declined_by(traceparent) else self._context(index)
            spans.append(self._command_span(item, parent, batch_links) if parent is not None else None)
        return spans if any(span is not None for span in spans) else None

    def _command_span(self, item: Processed, parent: context.Context, batch_links) -> trace.Span | None:
        """The command's span if it is sampled. Its attributes are set once it is: the sampler
        decides on the parent and the trace id (all the standard samplers do), so an unsampled
        command costs no attribute building."""
        record, outcome = item.parsed.record, item.outcome
        span = start_span_if_sampled(f"apply {outcome.type or 'invalid record'}", parent, kind=SpanKind.CONSUMER,
                                     links=batch_links, start_time=self.started_ns)
        if span is None:
            return None
        span.set_attributes({"messaging.system": "kafka", "messaging.message.id": outcome.command_id,
                             "messaging.kafka.offset": record.offset, "segmentation.command.status": outcome.status,
                             "segmentation.command.replayed": item.replayed})
        if outcome.type:
            span.set_attribute("segmentation.command.type", outcome.type)
        if record.timestamp_ms is not None:
            span.set_attribute("segmentation.kafka.wait_ms", max(0, self.started_ns // 1_000_000 - record.timestamp_ms))
        if isinstance(item.parsed, InvalidRecord):
            span.set_attribute("segmentation.dlq", True)
        if outcome.status != "applied":
            span.set_attribute("error.type", outcome.error["code"])
            span.set_status(Status(StatusCode.ERROR, f"{outcome.status}: {outcome.error['code']}: "
                                                     f"{outcome.error['message']}"))
        return span

    def finish(self, spans: list[trace.Span | None] | None) -> None:
        for span in spans or ():
            if span is not None:
                span.end()
        if self.span is not None:
            self.span.end()


class TracingObserver:
    """The batch observer (observers.py) that traces: a BatchTrace per batch."""

    def observe(self, partitions: list[TopicPartition], parsed: list[ParsedRecord]) -> _TracedBatch:
        return _TracedBatch(BatchTrace(partitions, parsed))

    def retrying(self, stalled: dict[str, int], attempt: int, error: BaseException) -> None:
        pass  # the batch span records the failure that ends the retries


class _TracedBatch:
    def __init__(self, traced: BatchTrace) -> None:
        self._traced = traced
        self._spans: list[trace.Span | None] | None = None

    @contextlib.contextmanager
    def applying(self):
        # A batch that is not sampled records no database spans: their instrumentation is skipped.
        with self._traced, suppress_instrumentation() if not self._traced.recording else contextlib.nullcontext():
            yield

    def applied(self, result: BatchResult) -> None:
        self._spans = self._traced.command_spans(result.processed)

    def publishing(self) -> BatchTrace:
        return self._traced

    def outcome_contexts(self) -> list[trace.Span | None] | None:
        return self._spans

    def published(self, result: BatchResult) -> None:
        self._traced.finish(self._spans)
