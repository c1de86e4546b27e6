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
        self._wanted: dict[TopicPartition, int] = {}  # each partition's last offset handed over
        self._holds: dict[TopicPartition, dict[str, int]] = {}  # command id -> its offset, per partition
        self._handed = asyncio.Event()  # something is pending
        self._idle = asyncio.Event()  # nothing pending and no commit in flight
        self._idle.set()

    def hand_over(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these next offsets soon. A partition's batches hand over in order, so a later
        offset replaces an earlier one still pending. No partition's commit passes a held command."""
        self._wanted.update(offsets)
        self._pending.update({tp: min(offset, *self._holds[tp].values()) if self._holds.get(tp) else offset
                              for tp, offset in offsets.items()})
        self._idle.clear()
        self._handed.set()

    def hold(self, tp: TopicPartition, offset: int, command_id: str) -> None:
        """Commit nothing of the partition from this command on until it is released: a command
        applied whose outcome is not stored yet (a segment's members removed in chunks) must be
        delivered again after a crash."""
        held = self._holds.setdefault(tp, {})
        held[command_id] = min(offset, held.get(command_id, offset))

    def held(self) -> set[str]:
        return {command_id for held in self._holds.values() for command_id in held}

    def release(self, command_ids: set[str]) -> None:
        """These commands' outcomes are stored and published: their partitions commit on."""
        for tp, held in self._holds.items():
            if held.keys() & command_ids:
                for command_id in command_ids:
                    held.pop(command_id, None)
                if tp in self._wanted and tp in self._kafka_consumer.assignment():
                    self.hand_over({tp: self._wanted[tp]})

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
