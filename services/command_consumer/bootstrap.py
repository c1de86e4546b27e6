"""Where the consumer's parts are wired from the settings: each gets only its section."""

from __future__ import annotations

import asyncpg

from services.command_consumer import repository
from services.command_consumer.consumer import CommandConsumer
from shared.settings import ConsumerSettings, DatabaseSettings, KafkaSettings, Settings


async def open_pool(settings: Settings) -> asyncpg.Pool:
    return await repository.open_pool(settings.section(DatabaseSettings), settings.topic_partitions)


def build_consumer(settings: Settings, pool: asyncpg.Pool) -> CommandConsumer:
    return CommandConsumer(settings.section(KafkaSettings), settings.section(ConsumerSettings), pool,
                           outcome_retention=settings.outcome_retention, database_url=settings.require_database_url())
