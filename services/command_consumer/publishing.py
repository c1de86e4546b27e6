"""Outcomes to the results topic and invalid records to the DLQ: the records built here (pure),
then sent together and acknowledged before the partition's offset is committed."""

from __future__ import annotations

import asyncio
import functools
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from opentelemetry import propagate, trace

from services.command_consumer.batch import Processed
from services.command_consumer.parsing import InvalidRecord
from shared.kafka import send_batched
from shared.outcomes import OutcomeRow

Headers = list[tuple[str, bytes]]
DLQ_MESSAGE_LIMIT = 4000  # bytes of the reason kept in a header


class Message(NamedTuple):
    value: bytes | None
    key: bytes | None
    headers: Headers


def outcome_message(item: Processed, consistency_token: str | None = None,
                    trace_context: Headers | None = None) -> Message:
    """The results-topic record of an outcome: keyed by command id, with the contract's headers
    and the trace context: its command span's (`trace_context`, see span_headers) when the
    command was traced here, else the command's own `traceparent`, if it had one."""
    if trace_context is None:
        traceparent = item.parsed.record.header("traceparent")
        trace_context = [("traceparent", traceparent)] if traceparent is not None else []
    return outcome_record(item.outcome, consistency_token, trace_context)


def outcome_record(outcome: OutcomeRow, consistency_token: str | None, trace_context: Headers) -> Message:
    headers = [("command-id", outcome.command_id.encode()),
               ("command-type", (outcome.type or "").encode()),
               ("status", outcome.status.encode()),
               *trace_context]
    return Message(orjson.dumps(outcome.contract(consistency_token)), outcome.command_id.encode(), headers)


def dlq_message(invalid: InvalidRecord, trace_context: Headers | None = None) -> Message:
    """The original key and value, with why and where from in headers (and the command span's
    trace context, when it was traced)."""
    record = invalid.record
    return Message(record.value, record.key, [
        ("x-error-code", str(invalid.code).encode()),
        ("x-error-message", invalid.message.encode()[:DLQ_MESSAGE_LIMIT]),
        ("x-original-topic", record.topic.encode()),
        ("x-original-partition", str(record.partition).encode()),
        ("x-original-offset", str(record.offset).encode()),
        ("x-command-id", invalid.command_id.encode()),
        *(trace_context or ()),
    ])


def span_headers(span: trace.Span) -> Headers:
    """`span`'s context as Kafka headers, by the configured propagators (W3C traceparent and
    tracestate by default), so a reader of the record continues the trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode()) for name, value in carrier.items()]


def without_value(message: Message) -> Message:
    """A DLQ record whose value no broker would take: key, reason and position are kept, the
    value's size is said, rather than stall the partition on it."""
    size = str(len(message.value or b"")).encode()
    return Message(None, message.key, [*message.headers, ("x-original-value-bytes", size)])


class OutcomePublisher:
    """Outcomes go out as record batches, one per results partition (shared.kafka.send_batched),
    each sent with one call and acknowledged with one future: a batch of thousands of outcomes
    costs a few produce calls, not one `send` each with its own future. Dead letters, rare, go one
    by one.

    One batch's outcomes are handed to the producer at a time (`_handing`); their
    acknowledgements are awaited outside it, so publishes still overlap on the wire. The lock is
    there because the producer queues one record batch per partition and makes every other caller
    wait for it, counting the whole wait against the caller's request timeout: callers handing
    over at once would time out although each turn is short."""

    def __init__(self, producer: AIOKafkaProducer, results_topic: str, dlq_topic: str) -> None:
        self._producer = producer
        self._results_topic = results_topic
        self._dlq_topic = dlq_topic
        self._handing = asyncio.Lock()

    async def publish(self, processed: list[Processed], consistency_token: str | None = None,
                      spans: list[trace.Span | None] | None = None) -> None:
        """Every outcome of a batch (and the DLQ record of each invalid one), all acknowledged.
        An outcome whose command has a span carries that span's context; the others carry the
        command's own traceparent. Sent past aiokafka's instrumentation, if it is installed (its
        send span per record would double the cost of a traced command and add nothing the
        command span does not say)."""
        send = functools.partial(getattr(type(self._producer).send, "__wrapped__", type(self._producer).send),
                                 self._producer)
        async with self._handing:
            deliveries = await self._hand_over(processed, consistency_token, spans, send)
        await asyncio.gather(*deliveries)

    async def _hand_over(self, processed: list[Processed], consistency_token: str | None,
                         spans: list[trace.Span | None] | None, send) -> list:
        """Every record of a batch handed to the producer; their deliveries."""
        outcomes, deliveries = [], []
        for index, item in enumerate(processed):
            if item.pending:  # no outcome yet: it is published when stored (removals.py)
                continue
            span = spans[index] if spans is not None else None
            trace_context = span_headers(span) if span is not None else None
            message = outcome_message(item, consistency_token, trace_context)
            outcomes.append((message.key, message.value, message.headers))
            if isinstance(item.parsed, InvalidRecord):
                message = dlq_message(item.parsed, trace_context)
                try:
                    deliveries.append(await send(self._dlq_topic, message.value, key=message.key,
                                                 headers=message.headers))
                except MessageSizeTooLargeError:
                    message = without_value(message)
                    deliveries.append(await send(self._dlq_topic, message.value, key=message.key,
                                                 headers=message.headers))
        return deliveries + await send_batched(self._producer, self._results_topic, outcomes)

    async def publish_outcome(self, outcome: OutcomeRow, consistency_token: str | None,
                              traceparent: bytes | None) -> None:
        """One outcome stored after its batch (a segment's removal in chunks), acknowledged."""
        message = outcome_record(outcome, consistency_token, [("traceparent", traceparent)] if traceparent else [])
        async with self._handing:
            delivery = await send_batched(self._producer, self._results_topic,
                                          [(message.key, message.value, message.headers)])
        await asyncio.gather(*delivery)
