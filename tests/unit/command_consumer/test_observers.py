"""Observations: every observer of a batch called at the same points, as one."""

from __future__ import annotations

import contextlib

from aiokafka import TopicPartition

from services.command_consumer.observers import BatchResult, Observations
from tests.unit.command_consumer.test_pipeline import records


class Observer:
    def __init__(self, name: str, log: list, contexts=None) -> None:
        self.name, self.log, self.contexts = name, log, contexts

    def observe(self, partitions, parsed):
        return self

    @contextlib.contextmanager
    def applying(self):
        self.log.append(f"{self.name} in")
        yield
        self.log.append(f"{self.name} out")

    publishing = applying

    def applied(self, result):
        self.log.append(f"{self.name} applied")

    def outcome_contexts(self):
        return self.contexts

    def published(self, result):
        self.log.append(f"{self.name} published")


def test_each_observer_is_called_in_turn_and_contexts_come_from_the_one_that_has_them():
    log: list[str] = []
    observations = Observations([Observer("metrics", log), Observer("tracing", log, contexts=["span"])],
                                [TopicPartition("t", 0)], [])
    result = BatchResult({TopicPartition("t", 0): records(0, 4, 5)}, [], "0/1", 0.0, 0.0)
    with observations.applying():
        observations.applied(result)
    observations.published(result)
    assert log == ["metrics in", "tracing in", "metrics applied", "tracing applied", "tracing out", "metrics out",
                   "metrics published", "tracing published"]
    assert observations.outcome_contexts() == ["span"]
    assert result.next_offsets == {TopicPartition("t", 0): 6}
