"""The consumer's offset committer without Kafka: what batches hand over is committed in as few
requests as possible, never out of order, and flush() waits for it."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError

from services.command_consumer.offsets import OffsetCommitter

A, B, C = (TopicPartition("assignments.commands", partition) for partition in range(3))


class Broker:
    """Records each commit request; each takes until `release` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.requests: list[dict[TopicPartition, int]] = []
        self.release = asyncio.Event()
        self.error = error

    async def commit(self, offsets):
        self.requests.append(dict(offsets))
        await self.release.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


async def test_offsets_handed_over_during_a_commit_go_in_one_request_with_the_latest_of_each():
    broker = Broker()
    committer = OffsetCommitter(broker)
    running = asyncio.create_task(committer.run())
    try:
        committer.hand_over({A: 10})
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert broker.requests == [{A: 10}]  # in flight
        committer.hand_over({A: 20, B: 5})
        committer.hand_over({A: 30})
        committer.hand_over({C: 7})
        flushed = asyncio.create_task(committer.flush())
        await asyncio.sleep(0.01)
        assert not flushed.done()  # the first request has not returned
        broker.release.set()
        await asyncio.wait_for(flushed, 1)
        assert broker.requests == [{A: 10}, {A: 30, B: 5, C: 7}]
    finally:
        running.cancel()


async def test_a_refused_commit_is_dropped_and_any_other_error_ends_the_committer():
    broker = Broker(CommitFailedError("the group rebalanced"))
    broker.release.set()
    committer = OffsetCommitter(broker)
    running = asyncio.create_task(committer.run())
    committer.hand_over({A: 10})
    await asyncio.wait_for(committer.flush(), 1)  # refused, logged, dropped
    assert not running.done()
    broker.error = KafkaConnectionError("broker gone")
    committer.hand_over({A: 11})
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(running, 1)
    assert broker.requests == [{A: 10}, {A: 11}]


async def test_no_commit_passes_a_held_command_until_it_is_released():
    broker = Broker()
    broker.release.set()
    broker.assignment = lambda: {A, B}
    committer = OffsetCommitter(broker)
    running = asyncio.create_task(committer.run())
    try:
        committer.hold(A, 15, "delete-big")  # applied, its outcome not stored yet
        committer.hand_over({A: 30, B: 5})
        await committer.flush()
        assert broker.requests == [{A: 15, B: 5}]
        assert committer.held() == {"delete-big"}
        committer.release({"delete-big"})
        await committer.flush()
        assert broker.requests == [{A: 15, B: 5}, {A: 30}]
        assert committer.held() == set()
    finally:
        running.cancel()
