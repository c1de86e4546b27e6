"""What watches a batch go through the pipeline: one interface, with metrics (telemetry.py) and
tracing (spans.py) as its implementations. The pipeline calls every observer at the same points
and knows nothing of what they record.

    observation = observer.observe(partitions, parsed)
    with observation.applying():        # around the transaction (and its retries)
        ...
    observation.applied(result)         # effects and outcomes durable in PostgreSQL
    with observation.publishing():      # around sending outcomes and dead letters
        ... observation.outcome_contexts() ...
    observation.published(result)       # acknowledged by Kafka; offsets handed over
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition

from services.command_consumer.batch import Processed
from services.command_consumer.parsing import ParsedRecord


@dataclass(slots=True)
class BatchResult:
    """A batch once applied: its records by partition, what each became, the consistency token of
    its outcomes, and when it became durable and published."""

    records: dict[TopicPartition, list[Any]]
    processed: list[Processed]
    token: str
    applied_in: float  # seconds from the batch's start to its commit
    durable_at: float  # epoch seconds of the commit
    published_at: float = 0.0  # epoch seconds of Kafka's acknowledgement

    @property
    def next_offsets(self) -> dict[TopicPartition, int]:
        return {tp: records[-1].offset + 1 for tp, records in self.records.items()}


class BatchObservation(Protocol):
    def applying(self) -> contextlib.AbstractContextManager: ...

    def applied(self, result: BatchResult) -> None: ...

    def publishing(self) -> contextlib.AbstractContextManager: ...

    def outcome_contexts(self) -> list | None:
        """The trace context each outcome record carries on (None: none)."""

    def published(self, result: BatchResult) -> None: ...


class BatchObserver(Protocol):
    def observe(self, partitions: list[TopicPartition], parsed: list[ParsedRecord]) -> BatchObservation: ...

    def retrying(self, stalled: dict[str, int], attempt: int, error: BaseException) -> None:
        """A batch transaction failed; `stalled`: the first offset of each "topic:partition"."""


class Observations:
    """The observations of one batch by every observer, called as one."""

    def __init__(self, observers: list[BatchObserver], partitions: list[TopicPartition],
                 parsed: list[ParsedRecord]) -> None:
        self._each = [observer.observe(partitions, parsed) for observer in observers]

    def applying(self) -> contextlib.AbstractContextManager:
        return self._all("applying")

    def publishing(self) -> contextlib.AbstractContextManager:
        return self._all("publishing")

    @contextlib.contextmanager
    def _all(self, phase: str) -> Iterator[None]:
        """Every observation's context of this phase, entered in order and left in reverse."""
        with contextlib.ExitStack() as stack:
            for observation in self._each:
                stack.enter_context(getattr(observation, phase)())
            yield

    def applied(self, result: BatchResult) -> None:
        for observation in self._each:
            observation.applied(result)

    def outcome_contexts(self) -> list | None:
        return next((found for observation in self._each if (found := observation.outcome_contexts())), None)

    def published(self, result: BatchResult) -> None:
        for observation in self._each:
            observation.published(result)
