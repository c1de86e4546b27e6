"""A small client for producer services: validated commands, published to the right topic with
the right key, answering where each record went. The query API's POST /commands uses it too.

    async with CommandPublisher(get_settings()) as publisher:
        sent = await publisher.publish({"type": "create_user", "user_id": 1000})
        print(sent.command_id, sent.topic, sent.partition, sent.offset)
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.commands import SEGMENT_COMMAND_TYPES, command_adapter, partition_key
from shared.kafka import create_producer
from shared.settings import Settings


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached or did not acknowledge in time; nothing was published."""


@dataclass(frozen=True, slots=True)
class Sent:
    command_id: str
    topic: str
    partition: int
    offset: int


class CommandPublisher:
    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
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
                    await asyncio.wait_for(producer.start(), self.timeout)
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
        validated = command_adapter.validate_python(command)
        command = {**command, "command_id": validated.command_id or uuid.uuid4().hex}
        topic = (self.settings.segments_commands_topic if validated.type in SEGMENT_COMMAND_TYPES
                 else self.settings.assignments_commands_topic)
        headers = [("traceparent", traceparent.encode())] if traceparent else []
        producer = await self.start()
        try:
            metadata = await asyncio.wait_for(
                producer.send_and_wait(topic, orjson.dumps(command), key=partition_key(validated), headers=headers),
                self.timeout)
        except (TimeoutError, KafkaError, OSError) as error:
            raise KafkaUnavailable(f"Kafka is unavailable, the command was not published: {error!r}") from error
        return Sent(command["command_id"], topic, metadata.partition, metadata.offset)
