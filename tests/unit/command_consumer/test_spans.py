"""TracingObserver: a span per batch, a span per command in its producer's trace, and the outcome
records carrying each command's context on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition
from opentelemetry.trace import SpanKind, StatusCode

from services.command_consumer.batch import Processed
from services.command_consumer.observers import BatchResult
from services.command_consumer.parsing import RecordRef, ValidCommand
from services.command_consumer.spans import TracingObserver
from shared.commands import CreateUser
from shared.outcomes import OutcomeRow

AT = datetime(2026, 12, 6, tzinfo=UTC)
TOPIC = "assignments.commands"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"



def processed(offset: int, traceparent: str | None, status: str = "applied") -> Processed:
    headers = (("traceparent", traceparent.encode()),) if traceparent else ()
    record = RecordRef(TOPIC, 0, offset, b"1", b"{}", headers, 1_700_000_000_000)
    error = {"code": "segment_not_found", "message": "no segment X"} if status == "rejected" else None
    return Processed(ValidCommand(record, f"c{offset}", CreateUser(type="create_user", user_id=1)),
                     OutcomeRow(f"c{offset}", "create_user", status, error, {}, AT, TOPIC, 0, offset), False)


def test_a_batch_span_and_a_span_per_command_in_its_own_trace(spans):
    batch = [processed(1, f"00-{TRACE}-00f067aa0ba902b7-01"), processed(2, None, status="rejected")]
    observation = TracingObserver().observe([TopicPartition(TOPIC, 0)], [item.parsed for item in batch])
    with observation.applying():
        pass
    result = BatchResult({TopicPartition(TOPIC, 0): [item.parsed.record for item in batch]}, batch, "0/1", 0.01, 0.0)
    observation.applied(result)
    contexts = observation.outcome_contexts()
    assert contexts is not None and len(contexts) == 2 and all(span is not None for span in contexts)
    with observation.publishing():
        pass
    observation.published(result)
    finished = {span.name: span for span in spans.get_finished_spans()}
    process = finished[f"process {TOPIC}"]
    assert process.kind is SpanKind.CONSUMER and process.attributes["messaging.batch.message_count"] == 2
    commands = [span for span in spans.get_finished_spans() if span.name == "apply create_user"]
    by_id = {span.attributes["messaging.message.id"]: span for span in commands}
    assert format(by_id["c1"].context.trace_id, "032x") == TRACE  # the producer's trace
    assert by_id["c2"].parent.span_id == process.context.span_id  # no context carried: the batch's
    assert by_id["c2"].status.status_code is StatusCode.ERROR and "segment_not_found" in by_id["c2"].status.description


def test_an_unsampled_command_has_no_span_and_its_outcome_no_new_context(spans):
    batch = [processed(1, f"00-{TRACE}-00f067aa0ba902b7-00")]  # the producer did not sample it
    observation = TracingObserver().observe([TopicPartition(TOPIC, 0)], [item.parsed for item in batch])
    result = BatchResult({TopicPartition(TOPIC, 0): [batch[0].parsed.record]}, batch, "0/1", 0.01, 0.0)
    with observation.applying():
        observation.applied(result)
    assert observation.outcome_contexts() is None
    observation.published(result)
    assert [span.name for span in spans.get_finished_spans() if span.name.startswith("apply")] == []


def test_a_failed_batch_ends_its_span_with_the_error(spans):
    batch = [processed(1, None)]
    observation = TracingObserver().observe([TopicPartition(TOPIC, 0)], [item.parsed for item in batch])
    with pytest.raises(ConnectionRefusedError), observation.applying():
        raise ConnectionRefusedError("database away")
    [span] = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR and "database away" in span.status.description
