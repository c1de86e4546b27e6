"""Static group membership: with CONSUMER_GROUP_INSTANCE_ID the consumer joins its group as that
instance, and a consumer restarted with the same id takes the place of the one before instead of
joining beside it (so no rebalance waits for a member that is gone). bench/consumer_recovery.py
measures what it saves after a SIGKILL."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from shared.kafka import kafka_options
from tests.support import running_consumer

pytestmark = pytest.mark.integration


async def members(settings) -> list[str]:
    """The member ids of the consumer group once it is stable with at least one member."""
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            [response] = await admin.describe_consumer_groups([settings.consumer_group])
            [group] = response.groups
            found = [member[0] for member in group[5]]
            if group[2] == "Stable" and found:
                return found
            assert time.monotonic() < deadline, f"the group never became stable: {group}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def test_a_restarted_consumer_rejoins_as_the_same_static_member(settings, pool):
    settings = settings.model_copy(update={"consumer_group_instance_id": "command-consumer-7"})
    async with running_consumer(settings, pool):
        [first] = await members(settings)
    async with running_consumer(settings, pool):
        [second] = await members(settings)
    # The broker names a static member after its instance id (a dynamic one after its client id).
    assert first.startswith("command-consumer-7-") and second.startswith("command-consumer-7-")


async def test_without_an_instance_id_membership_is_dynamic(settings, pool):
    async with running_consumer(settings, pool):
        [member] = await members(settings)
    assert not member.startswith("command-consumer")
