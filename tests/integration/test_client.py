"""The producer client in shared/: validated, keyed, tells where the record went."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from devstack.processes import free_port
from shared.client import CommandPublisher, KafkaUnavailable, OutcomeReader
from tests.support import header, read_topic, running_consumer, wait_for_outcomes

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


async def test_outcome_reader_sees_the_outcomes_of_what_was_published_after_it_opened(settings, pool):
    async with CommandPublisher(settings) as publisher, running_consumer(settings, pool):
        first = await publisher.publish({"type": "create_user", "user_id": 1, "command_id": "before"})
        await wait_for_outcomes(pool, [first.command_id])
        async with OutcomeReader(settings) as outcomes:
            deliveries = [await publisher.submit({"type": "create_user", "user_id": u, "command_id": f"c{u}"})
                          for u in range(2, 202)]
            sent = await asyncio.gather(*deliveries)
            assert [s.command_id for s in sent] == [f"c{user_id}" for user_id in range(2, 202)]
            seen: list[str] = []
            found = await outcomes.wait_for([s.command_id for s in sent] + ["never-published"], timeout=5,
                                            on_outcome=lambda outcome: seen.append(outcome["command_id"]))
    assert set(found) == set(seen) == {s.command_id for s in sent}  # and not "before", which came earlier
    assert {outcome["status"] for outcome in found.values()} == {"applied"}
    async with OutcomeReader(settings, from_beginning=True) as outcomes:
        assert "before" in await outcomes.wait_for(["before"], timeout=10)


async def test_outcome_reader_says_when_the_results_topic_is_missing(settings):
    with pytest.raises(KafkaUnavailable, match="does not exist"):
        async with OutcomeReader(settings.model_copy(update={"results_topic": "no.such.topic"})):
            pass
