"""The producer client in shared/: validated, keyed, tells where the record went."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from devstack.embedded import free_port
from shared.client import CommandPublisher, KafkaUnavailable
from tests.support import header, read_topic

pytestmark = pytest.mark.integration


async def test_publishes_to_the_right_topic_with_the_right_key(settings):
    async with CommandPublisher(settings) as publisher:
        segment = await publisher.publish({"type": "create_segment", "slug": "AVITO_DISCOUNT_30", "percent": 30})
        user = await publisher.publish({"type": "create_user", "user_id": 1000, "command_id": "mine"},
                                       traceparent="00-abc-def-01")
    assert segment.topic == settings.segments_commands_topic and len(segment.command_id) == 32
    assert user.topic == settings.assignments_commands_topic and user.command_id == "mine"
    [record] = await read_topic(settings, settings.assignments_commands_topic, 1)
    assert (record.key, record.partition, record.offset) == (b"1000", user.partition, user.offset)
    assert header(record, "traceparent") == "00-abc-def-01"
    [record] = await read_topic(settings, settings.segments_commands_topic, 1)
    assert record.key == b"AVITO_DISCOUNT_30" and b'"percent":30' in record.value


async def test_refuses_invalid_commands_before_publishing(settings):
    async with CommandPublisher(settings) as publisher:
        with pytest.raises(ValidationError):
            await publisher.publish({"type": "create_user", "user_id": "1000"})
    assert await read_topic(settings, settings.assignments_commands_topic, 1, timeout=1) == []


async def test_says_when_kafka_is_unavailable(settings):
    unreachable = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    publisher = CommandPublisher(unreachable, timeout=2)
    with pytest.raises(KafkaUnavailable, match="unavailable"):
        await publisher.publish({"type": "create_user", "user_id": 1})
    await publisher.stop()
