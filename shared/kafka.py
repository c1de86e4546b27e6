"""Kafka client settings shared by the services, and topic provisioning."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared.settings import Settings


def producer_options(settings: Settings) -> dict:
    # acks=all and a short linger: outcomes and DLQ records must be durable before offsets move.
    # No idempotent producer: the commands' own ids make effects idempotent, and some
    # Kafka-protocol brokers (the embedded one) do not implement InitProducerId.
    return {
        "bootstrap_servers": settings.require_kafka(),
        "acks": "all",
        "linger_ms": 2,
        # Room for anything the consumer can fetch (3x MAX_COMMAND_BYTES), so an oversized
        # command can still be dead-lettered with its original bytes.
        "max_request_size": settings.max_command_bytes * 3 + 65_536,
        "request_timeout_ms": 10_000,
    }


def create_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_options(settings))


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the contract's topics if missing. Returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.require_kafka(), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            settings.segments_commands_topic,
            settings.assignments_commands_topic,
            settings.results_topic,
            settings.dlq_topic,
        ]
        missing = [name for name in wanted if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, settings.topic_partitions, 1) for name in missing]
            )
            # Some brokers report a failure here instead of raising (0 = ok, 36 = already exists).
            failed = [(name, code) for name, code, *_ in response.topic_errors if code not in (0, 36)]
            if failed:
                raise RuntimeError(f"could not create topics: {failed}")
        return missing
    finally:
        await admin.close()
