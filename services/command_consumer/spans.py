"""The consumer's spans, when tracing is on (README: "Tracing"). One transaction applies many
commands, so the model follows OpenTelemetry's messaging conventions for batches:

- a span per batch ("process <topic>"), with a link to each command's context, parenting the
  database work of the batch (asyncpg's spans) and, when the batch holds a single command, a
  child of that command's context, so a lone command's trace shows its database work too;
- a short span per sampled command ("apply <type>") in its producer's trace, parented by the
  context its record carried (by the batch span when it carried none, and then sampled with the
  batch), from the batch's start until its outcome is durable, with the command id, its offset,
  how long it waited in Kafka, its status and error code, and a link to the batch span; a
  rejected or invalid command's span has status ERROR and says why. Its outcome is published
  inside it, so the outcome record carries its context. Unsampled commands get no span and cost
  nothing: their outcome carries the context their record had.
"""

from __future__ import annotations

import time

from aiokafka import TopicPartition
from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.command_consumer.batch import Processed
from services.command_consumer.parsing import InvalidRecord, ParsedRecord
from shared.tracing import HEADER_PAIRS, tracer


class BatchTrace:
    def __init__(self, tp: TopicPartition, batch: list[ParsedRecord]) -> None:
        self._tracer = tracer()
        empty = context.Context()
        self.contexts = [propagate.extract(parsed.record.headers, getter=HEADER_PAIRS)
                         if parsed.record.header("traceparent") is not None else empty for parsed in batch]
        links = []
        for extracted in self.contexts:
            span_context = trace.get_current_span(extracted).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        self.started_ns = time.time_ns()
        self.span = self._tracer.start_span(
            f"process {tp.topic}", kind=SpanKind.CONSUMER, links=links,
            context=self.contexts[0] if len(batch) == 1 else context.Context(),
            attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                        "messaging.destination.name": tp.topic, "messaging.destination.partition.id": str(tp.partition),
                        "messaging.batch.message_count": len(batch)})
        self._token = None

    def __enter__(self) -> BatchTrace:
        self._token = context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        context.detach(self._token)
        if error is not None:  # the batch failed: nothing of it was committed
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
            self.span.end()

    def command_spans(self, processed: list[Processed]) -> list[trace.Span | None]:
        """A span per sampled command (None for the others, which then cost nothing): one whose
        record carried a context follows that context's sampling decision; one that carried none
        is traced when its batch is, in the batch's trace."""
        batch_link = [Link(self.span.get_span_context())]
        batch_context = trace.set_span_in_context(self.span)
        batch_recorded = self.span.is_recording()
        spans: list[trace.Span | None] = []
        for item, parent in zip(processed, self.contexts, strict=True):
            parent_span = trace.get_current_span(parent).get_span_context()
            sampled = parent_span.trace_flags.sampled if parent_span.is_valid else batch_recorded
            spans.append(self._command_span(item, parent if parent_span.is_valid else batch_context, batch_link)
                         if sampled else None)
        return spans

    def _command_span(self, item: Processed, parent: context.Context, batch_link: list[Link]) -> trace.Span:
        record, outcome = item.parsed.record, item.outcome
        attributes = {"messaging.system": "kafka", "messaging.message.id": outcome.command_id,
                      "messaging.kafka.offset": record.offset, "segmentation.command.status": outcome.status,
                      "segmentation.command.replayed": item.replayed}
        if outcome.type:
            attributes["segmentation.command.type"] = outcome.type
        if record.timestamp_ms is not None:
            attributes["segmentation.kafka.wait_ms"] = max(0, self.started_ns // 1_000_000 - record.timestamp_ms)
        if outcome.error:
            attributes["error.type"] = outcome.error["code"]
        span = self._tracer.start_span(f"apply {outcome.type or 'invalid record'}", context=parent,
                                       kind=SpanKind.CONSUMER, links=batch_link, start_time=self.started_ns,
                                       attributes=attributes)
        if outcome.status != "applied":
            span.set_status(Status(StatusCode.ERROR, f"{outcome.status}: {outcome.error['code']}: "
                                                     f"{outcome.error['message']}"))
        if isinstance(item.parsed, InvalidRecord):
            span.set_attribute("segmentation.dlq", True)
        return span

    def finish(self, spans: list[trace.Span | None]) -> None:
        for span in spans:
            if span is not None:
                span.end()
        self.span.end()
