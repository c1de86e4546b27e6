"""Offset commits off the batches' path: a batch hands over its partitions' next offsets once its
outcomes are durable and acknowledged, and is done; one committer sends what has been handed over,
all partitions in one request, one request at a time.

Waiting for the commit in each batch kept its partition busy for a broker round trip more, and
sent one commit request per batch. Nothing is committed earlier than before: an offset is handed
over only after the batch's effects are committed in PostgreSQL and its outcomes acknowledged by
Kafka. A crash before the commit is sent redelivers those commands, which the inbox answers
with their stored outcomes, as for a crash between a batch's publish and its commit before.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

log = structlog.get_logger("command_consumer")


class OffsetCommitter:
    def __init__(self, kafka_consumer: AIOKafkaConsumer) -> None:
        self._kafka_consumer = kafka_consumer
        self._pending: dict[TopicPartition, int] = {}
        self._handed = asyncio.Event()  # something is pending
        self._idle = asyncio.Event()  # nothing pending and no commit in flight
        self._idle.set()

    def hand_over(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these next offsets soon. A partition's batches hand over in order, so a later
        offset replaces an earlier one still pending."""
        self._pending.update(offsets)
        self._idle.clear()
        self._handed.set()

    async def flush(self) -> None:
        """Until everything handed over so far is committed (or refused, see `run`)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Commit until cancelled. A refused commit (the partition moved in a rebalance) is logged
        and dropped: its new owner redelivers, and the inbox makes that harmless. Any other error
        ends `run` with it, and the consumer stops."""
        while True:
            await self._handed.wait()
            self._handed.clear()
            offsets, self._pending = self._pending, {}
            try:
                await self._kafka_consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as error:
                log.warning("offset commit refused after rebalance", error=str(error),
                            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in offsets))
            if not self._pending:
                self._idle.set()
