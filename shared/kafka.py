"""How every Kafka client of the project connects (consumer, producers, admin and provisioning,
the HTTP gateway, segmentctl, the Python client, benchmarks), and topic provisioning.

`kafka_options` is the one place that turns the settings into client options: bootstrap servers,
TLS (KAFKA_SSL_*) and SASL (KAFKA_SASL_*). `start_client` starts a client and, when it cannot
connect, says why in words: an untrusted or expired certificate, a wrong password.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.partitioner import murmur2

from shared.settings import KafkaSettings

SASL_REFUSALS = (AuthenticationFailedError, SaslAuthenticationFailed, AuthenticationMethodNotSupported,
                 UnsupportedSaslMechanismError, IllegalSaslStateError)


class KafkaSetupError(RuntimeError):
    """The Kafka settings cannot work (TLS or SASL refused); retrying will not help."""


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """Verifies the broker against KAFKA_SSL_CA_FILE (or the system's CAs) and its host name;
    presents KAFKA_SSL_CERT_FILE / KEY_FILE for mutual TLS."""
    context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_file)
    if settings.kafka_ssl_cert_file:
        password = settings.kafka_ssl_key_password
        context.load_cert_chain(settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file,
                                password=password.get_secret_value() if password else None)
    return context


def kafka_options(settings: KafkaSettings) -> dict[str, Any]:
    """The connection options of any aiokafka client (consumer, producer, admin)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"bootstrap_servers": settings.require_kafka(), "security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return options


async def start_client(client, settings: KafkaSettings) -> None:
    """`client.start()`, failing fast with the reason when the settings cannot work."""
    try:
        await client.start()
    except KafkaConnectionError as error:
        # aiokafka logs why each bootstrap server failed and raises only "Unable to bootstrap".
        reason = await _tls_refusal(settings) or await _sasl_refusal(settings)
        if reason:
            raise KafkaSetupError(reason) from error
        raise


def _first_server(settings: KafkaSettings) -> tuple[str, str, int]:
    address = settings.require_kafka().split(",")[0].strip()
    host, _, port = address.rpartition(":")
    return address, host, int(port)


async def _sasl_refusal(settings: KafkaSettings) -> str | None:
    """Why the first bootstrap server refuses the SASL credentials, if it does."""
    if not settings.kafka_security_protocol.startswith("SASL_"):
        return None
    address, host, port = _first_server(settings)
    options = kafka_options(settings)
    del options["bootstrap_servers"]
    try:
        connection = await asyncio.wait_for(create_conn(host, port, **options), 10)
    except SASL_REFUSALS as error:
        return (f"Kafka at {address} refused SASL {settings.kafka_sasl_mechanism} for user "
                f"{settings.kafka_sasl_username!r}: {error}. Check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and "
                "KAFKA_SASL_MECHANISM (and that the listener takes SASL).")
    except (OSError, TimeoutError, KafkaError):
        return None  # not a SASL problem
    connection.close()
    return None


async def _tls_refusal(settings: KafkaSettings) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails, if it does."""
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    address, host, port = _first_server(settings)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context(settings), server_hostname=host), 10)
    except ssl.SSLCertVerificationError as error:
        return (f"Kafka at {address}: the broker's TLS certificate is not trusted "
                f"(certificate verify failed: {error.verify_message}). "
                "Set KAFKA_SSL_CA_FILE to the CA that signed it, and check the certificate's host name "
                "and validity dates.")
    except ssl.SSLError as error:
        return f"Kafka at {address}: the TLS handshake failed ({error.reason or error}). Check KAFKA_SSL_*."
    except (OSError, TimeoutError):
        return None  # not a TLS problem: unreachable
    writer.close()
    return None


def producer_options(settings: KafkaSettings) -> dict:
    # acks=all and a short linger: outcomes and DLQ records must be durable before offsets move.
    # No idempotent producer: the commands' own ids make effects idempotent, and some
    # Kafka-protocol brokers (the embedded one) do not implement InitProducerId.
    return {
        **kafka_options(settings),
        "acks": "all",
        "linger_ms": 2,
        # Record batches of up to 256 KiB (the client's default is 16 KiB): the consumer publishes a
        # whole partition batch's outcomes at once, and each batch is one queue slot and one future.
        # Under the 1 MiB a broker takes in one batch by default.
        "max_batch_size": 262_144,
        # Room for anything the consumer can fetch (3x MAX_COMMAND_BYTES), so an oversized
        # command can still be dead-lettered with its original bytes.
        "max_request_size": settings.max_command_bytes * 3 + 65_536,
        "request_timeout_ms": 10_000,
    }


def create_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_options(settings))


async def ensure_topics(settings: KafkaSettings) -> list[str]:
    """Create the contract's topics if missing. Returns the names created."""
    admin = AIOKafkaAdminClient(**kafka_options(settings), request_timeout_ms=10_000)
    await start_client(admin, settings)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            settings.segments_commands_topic,
            settings.assignments_commands_topic,
            settings.results_topic,
            settings.dlq_topic,
            settings.membership_changes_topic,
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


@functools.lru_cache(maxsize=65_536)
def _key_hash(key: bytes) -> int:
    """The default partitioner's hash of a key (murmur2, positive), remembered: aiokafka's is pure
    Python, and the same keys (users, segments) come back batch after batch."""
    return murmur2(key) & 0x7FFFFFFF


async def send_batched(producer: AIOKafkaProducer, topic: str,
                       records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> list[asyncio.Future]:
    """Hands (key, value, headers) records to the producer as one record batch per partition (by
    the key's murmur2, as the default partitioner places them), in order within each partition;
    returns the deliveries to await. A few produce calls and futures per batch of thousands,
    where a `send` each would cost one future and one queue slot per record."""
    partitions = sorted(await producer.partitions_for(topic))
    builders: dict[int, Any] = {}
    deliveries = []
    for key, value, headers in records:
        partition = partitions[_key_hash(key) % len(partitions)]
        builder = builders.get(partition)
        if builder is None or builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            if builder is not None:  # full, and so closed by the builder: send it, start the next
                deliveries.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            builder.append(key=key, value=value, timestamp=None, headers=headers)
    for partition, builder in builders.items():
        builder.close()  # a closed batch is sent at once instead of waiting out the linger
        deliveries.append(await producer.send_batch(builder, topic, partition=partition))
    return deliveries
