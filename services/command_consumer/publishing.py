"""Outcomes to the results topic and invalid records to the DLQ: the records built here (pure),
then sent together and acknowledged before the partition's offset is committed."""

from __future__ import annotations

import asyncio
import functools
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from opentelemetry import trace

from services.command_consumer.batch import Processed
from services.command_consumer.parsing import InvalidRecord

Headers = list[tuple[str, bytes]]
DLQ_MESSAGE_LIMIT = 4000  # bytes of the reason kept in a header


class Message(NamedTuple):
    value: bytes | None
    key: bytes | None
    headers: Headers


def outcome_message(item: Processed, consistency_token: str | None = None, copy_trace: bool = True) -> Message:
    """The results-topic record of an outcome: keyed by command id, with the contract's headers
    and the command's own `traceparent`, if it had one (with tracing on, the instrumented send puts
    the command span's context there instead)."""
    outcome = item.outcome
    headers = [("command-id", outcome.command_id.encode()),
               ("command-type", (outcome.type or "").encode()),
               ("status", outcome.status.encode())]
    traceparent = item.parsed.record.header("traceparent") if copy_trace else None
    if traceparent is not None:
        headers.append(("traceparent", traceparent))
    return Message(orjson.dumps(outcome.contract(consistency_token)), outcome.command_id.encode(), headers)


def dlq_message(invalid: InvalidRecord) -> Message:
    """The original key and value, with why and where from in headers."""
    record = invalid.record
    return Message(record.value, record.key, [
        ("x-error-code", str(invalid.code).encode()),
        ("x-error-message", invalid.message.encode()[:DLQ_MESSAGE_LIMIT]),
        ("x-original-topic", record.topic.encode()),
        ("x-original-partition", str(record.partition).encode()),
        ("x-original-offset", str(record.offset).encode()),
        ("x-command-id", invalid.command_id.encode()),
    ])


def without_value(message: Message) -> Message:
    """A DLQ record whose value no broker would take: key, reason and position are kept, the
    value's size is said, rather than stall the partition on it."""
    size = str(len(message.value or b"")).encode()
    return Message(None, message.key, [*message.headers, ("x-original-value-bytes", size)])


class OutcomePublisher:
    def __init__(self, producer: AIOKafkaProducer, results_topic: str, dlq_topic: str) -> None:
        self._producer = producer
        self._results_topic = results_topic
        self._dlq_topic = dlq_topic

    async def publish(self, processed: list[Processed], consistency_token: str | None = None,
                      spans: list[trace.Span | None] | None = None) -> None:
        """Every outcome of a batch (and the DLQ record of each invalid one), all acknowledged.
        With tracing on, an outcome whose command has a span is sent inside it (the instrumented
        send puts its context in the headers); the others go as with tracing off, the command's
        own traceparent copied, without the instrumentation's cost."""
        deliveries = []
        for index, item in enumerate(processed):
            span = spans[index] if spans is not None else None
            if span is None:
                await self._publish_one(item, consistency_token, deliveries, traced=False)
            else:
                with trace.use_span(span, end_on_exit=False):
                    await self._publish_one(item, consistency_token, deliveries, traced=True)
        await asyncio.gather(*deliveries)

    async def _publish_one(self, item: Processed, consistency_token: str | None, deliveries: list,
                           traced: bool) -> None:
        deliveries.append(await self._send(self._results_topic,
                                           outcome_message(item, consistency_token, copy_trace=not traced), traced))
        if isinstance(item.parsed, InvalidRecord):
            message = dlq_message(item.parsed)
            try:
                deliveries.append(await self._send(self._dlq_topic, message, traced))
            except MessageSizeTooLargeError:
                deliveries.append(await self._send(self._dlq_topic, without_value(message), traced))

    async def _send(self, topic: str, message: Message, traced: bool) -> asyncio.Future:
        send = self._producer.send
        if not traced:  # past an instrumentation's wrapper, if one is installed
            send = functools.partial(getattr(type(self._producer).send, "__wrapped__", type(self._producer).send),
                                     self._producer)
        return await send(topic, message.value, key=message.key, headers=message.headers)
