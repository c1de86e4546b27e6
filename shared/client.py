"""A small client for producer services: validated commands, published to the right topic with
the right key, answering where each record went; and a reader of their outcomes. The query API's
POST /commands and segmentctl use it too.

    async with CommandPublisher(get_settings()) as publisher:
        sent = await publisher.publish({"type": "create_user", "user_id": 1000})
        print(sent.command_id, sent.topic, sent.partition, sent.offset)

    async with OutcomeReader(settings) as outcomes:      # opened before publishing: sees its outcome
        sent = await publisher.publish(command)
        outcome = (await outcomes.wait_for({sent.command_id}, timeout=30))[sent.command_id]

    async with ChangeReader(settings, segment="AVITO_DISCOUNT_30", since=datetime(2026, 12, 1, tzinfo=UTC)) as changes:
        async for change in changes:                     # MembershipChange or RolloutChange, each once
            print(change.event_id, change.kind, change.executed_at)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared import tracing
from shared.changes import MembershipChange, RolloutChange, decode
from shared.commands import SEGMENT_COMMAND_TYPES, command_adapter, partition_key
from shared.kafka import KafkaSetupError, create_producer, kafka_options, start_client
from shared.rollout import rollout_bucket
from shared.settings import KafkaSettings


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached or did not acknowledge in time; nothing was published."""


@dataclass(frozen=True, slots=True)
class Sent:
    command_id: str
    topic: str
    partition: int
    offset: int


class CommandPublisher:
    def __init__(self, settings: KafkaSettings, timeout: float = 5.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def __aenter__(self) -> CommandPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> AIOKafkaProducer:
        """Connect if not connected yet; a failure can be retried by the next call."""
        async with self._starting:
            if self._producer is None:
                producer = create_producer(self.settings)
                try:
                    await asyncio.wait_for(start_client(producer, self.settings), self.timeout)
                except KafkaSetupError:
                    await producer.stop()
                    raise
                except (TimeoutError, KafkaError, OSError) as error:
                    await producer.stop()
                    raise KafkaUnavailable(f"Kafka at {self.settings.kafka_bootstrap_servers} is unavailable: "
                                           f"{error!r}") from error
                self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ping(self) -> None:
        """Raises KafkaUnavailable unless the cluster answers a metadata request."""
        producer = await self.start()
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), self.timeout)
        except (TimeoutError, KafkaError, OSError) as error:
            raise KafkaUnavailable(f"Kafka is unavailable: {error!r}") from error

    async def publish(self, command: dict[str, Any], traceparent: str | None = None) -> Sent:
        """Validate (pydantic.ValidationError if invalid) and publish one command. A command
        without `command_id` gets one, so its outcome can be looked up."""
        delivery = await self.submit(command, traceparent)
        try:
            return await asyncio.wait_for(delivery, self.timeout)
        except TimeoutError as error:
            raise KafkaUnavailable("Kafka did not acknowledge the command in time; it may or may not have "
                                   "been published (publishing it again with its command_id is safe)") from error

    async def submit(self, command: dict[str, Any], traceparent: str | None = None) -> Awaitable[Sent]:
        """Validate and enqueue one command; await the result for its acknowledgement. Commands
        submitted one after the other keep that order on their key, and are sent in batches."""
        validated = command_adapter.validate_python(command)
        command = {**command, "command_id": validated.command_id or uuid.uuid4().hex}
        topic = (self.settings.segments_commands_topic if validated.type in SEGMENT_COMMAND_TYPES
                 else self.settings.assignments_commands_topic)
        # With tracing on, the instrumented send puts the current trace context (which continued the
        # caller's) in the headers; off, a caller's traceparent is passed on as it is.
        headers = [("traceparent", traceparent.encode())] if traceparent and not tracing.ENABLED else []
        producer = await self.start()
        try:
            delivery = await asyncio.wait_for(
                producer.send(topic, orjson.dumps(command), key=partition_key(validated), headers=headers),
                self.timeout)
        except (TimeoutError, KafkaError, OSError) as error:
            raise KafkaUnavailable(f"Kafka is unavailable, the command was not published: {error!r}") from error

        async def acknowledged() -> Sent:
            try:
                metadata = await delivery
            except (KafkaError, OSError) as error:
                raise KafkaUnavailable(f"Kafka is unavailable, the command was not published: {error!r}") from error
            return Sent(command["command_id"], topic, metadata.partition, metadata.offset)

        return acknowledged()


async def _assigned_reader(settings: KafkaSettings, topic: str, timeout: float,
                           what: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    """A started consumer with every partition of `topic` assigned (no group)."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False, fetch_max_wait_ms=100,
                                request_timeout_ms=int(timeout * 1000) + 1000)
    try:
        await asyncio.wait_for(start_client(consumer, settings), timeout)
        await asyncio.wait_for(consumer.topics(), timeout)
    except KafkaSetupError:
        await consumer.stop()
        raise
    except (TimeoutError, KafkaError, OSError) as error:
        await consumer.stop()
        raise KafkaUnavailable(f"Kafka at {settings.kafka_bootstrap_servers} is unavailable: {error!r}") from error
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not partitions:
        await consumer.stop()
        raise KafkaUnavailable(f"the {what} topic {topic!r} does not exist (is the service provisioned?)")
    consumer.assign(partitions)
    return consumer, partitions


class OutcomeReader:
    """Outcomes as they arrive on the results topic, from its end at the moment it is opened (or
    from the beginning). Open it before publishing to be sure to see the commands' outcomes."""

    def __init__(self, settings: KafkaSettings, from_beginning: bool = False, timeout: float = 5.0) -> None:
        self.settings = settings
        self.from_beginning = from_beginning
        self.timeout = timeout

    async def __aenter__(self) -> OutcomeReader:
        self._consumer, partitions = await _assigned_reader(self.settings, self.settings.results_topic, self.timeout,
                                                            "results")
        await (self._consumer.seek_to_beginning if self.from_beginning else self._consumer.seek_to_end)(*partitions)
        for partition in partitions:  # resolve "the end" now, not at the first fetch
            await self._consumer.position(partition)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._consumer.stop()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:
                        yield orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue  # not an outcome; the consumer only ever writes JSON here

    async def wait_for(self, command_ids: Collection[str], timeout: float,
                       on_outcome: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """The outcomes of these commands, as many as arrive within `timeout` seconds."""
        wanted, found = set(command_ids), {}

        async def collect() -> None:
            async for outcome in self:
                command_id = outcome.get("command_id")
                if command_id in wanted and command_id not in found:
                    found[command_id] = outcome
                    if on_outcome:
                        on_outcome(outcome)
                    if len(found) == len(wanted):
                        return

        if wanted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collect(), timeout)
        return found


class ChangeReader:
    """Membership changes (docs/contract.md, Membership changes) as they are published, from the
    end of the topic at the moment it is opened, from `since` (changes executed then or later), or
    from the beginning. Filters: one segment (its members' entries and exits and its rollout
    changes); one user (its entries and exits, and the rollout changes whose bucket range holds
    its bucket: those moved it unless it is an explicit member or was removed). Each event is
    yielded once: a change published again carries the same id and is dropped."""

    def __init__(self, settings: KafkaSettings, *, segment: str | None = None, user_id: int | None = None,
                 since: datetime | None = None, from_beginning: bool = False, timeout: float = 5.0,
                 remember: int = 100_000) -> None:
        self.settings = settings
        self.segment = segment
        self.user_id = user_id
        self.since = since
        self.from_beginning = from_beginning
        self.timeout = timeout
        self._seen: OrderedDict[str, None] = OrderedDict()  # the latest `remember` event ids
        self._remember = remember

    async def __aenter__(self) -> ChangeReader:
        topic = self.settings.membership_changes_topic
        self._consumer, partitions = await _assigned_reader(self.settings, topic, self.timeout, "membership-changes")
        if self.since is not None:
            found = await self._consumer.offsets_for_times(
                {partition: int(self.since.timestamp() * 1000) for partition in partitions})
            for partition in partitions:
                at = found.get(partition)
                if at is None:  # nothing published since: from the end
                    await self._consumer.seek_to_end(partition)
                else:
                    self._consumer.seek(partition, at.offset)
        elif self.from_beginning:
            await self._consumer.seek_to_beginning(*partitions)
        else:
            await self._consumer.seek_to_end(*partitions)
        for partition in partitions:  # resolve the starting points now, not at the first fetch
            await self._consumer.position(partition)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._consumer.stop()

    def wanted(self, change: MembershipChange | RolloutChange) -> bool:
        if self.since is not None and change.executed_at < self.since:
            return False
        if self.segment is not None and change.segment != self.segment:
            return False
        if self.user_id is not None:
            if isinstance(change, MembershipChange):
                return change.user_id == self.user_id
            return change.moves(rollout_bucket(change.segment, self.user_id)) is not None
        return True

    async def __aiter__(self) -> AsyncIterator[MembershipChange | RolloutChange]:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:
                        change = decode(record.value)
                    except ValidationError:
                        continue  # not an event of the contract's; the publisher writes nothing else
                    if change.event_id in self._seen or not self.wanted(change):
                        continue
                    self._seen[change.event_id] = None
                    if len(self._seen) > self._remember:
                        self._seen.popitem(last=False)
                    yield change
