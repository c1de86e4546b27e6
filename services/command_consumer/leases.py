"""Partition leases: the consumer owns command partitions by holding a PostgreSQL advisory lock
per partition, instead of by joining a Kafka consumer group (CONSUMER_PARTITION_OWNERSHIP=lease;
README: "Partition ownership").

Kafka's group protocol learns that a member died only when its session times out, and then
rebalances; a SIGKILLed consumer's partitions stay idle for that long. The process that applies
commands already holds a session on the database it writes to, and PostgreSQL ends a session,
and releases its advisory locks, the moment the client's connection closes. So a partition is
leased by a session-level advisory lock on one connection kept for nothing else: a restarted
process, or a second process started as a standby, takes the partitions as soon as the old
holder is gone. The Kafka side is manual assignment (`assign`), with offsets still committed
under the consumer group's id, so lag stays visible where operators look for it.

What a lease guarantees, and what it does not: while a process holds a lease, no other process
of the same group takes that partition. A holder that loses its database session (network, a
server restart) loses its leases at once, and stops fetching those partitions; a batch it has
in hand may still commit, exactly as a zombie member's batch after a group rebalance, and the
inbox makes that harmless (a second writer of the same command fails on the outcome's unique
key and retries into the stored outcome). A host that vanishes without closing its connections
holds its leases until the server's TCP keepalives give up on it (set below, about 20 s).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable

import asyncpg
import structlog
from aiokafka import TopicPartition
from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.command_consumer.metrics import PARTITIONS_LEASED
from shared.db import TRANSIENT_DB_ERRORS, Backoff

log = structlog.get_logger("command_consumer")

# The server gives up on a silent client after about idle + interval x count seconds (TCP only;
# a Unix socket's peer cannot vanish without the kernel closing it).
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "3", "tcp_keepalives_count": "3",
              "application_name": "segmentation command consumer leases"}


def lease_key(group: str, tp: TopicPartition) -> int:
    """The advisory lock key of a partition for a consumer group: a stable signed 64-bit hash,
    distinct per (group, topic, partition), the same in every process and version."""
    digest = hashlib.blake2b(f"{group}\0{tp.topic}\0{tp.partition}".encode(), digest_size=8,
                             person=b"seg-lease").digest()
    return int.from_bytes(digest, "big", signed=True)


class PartitionLeases:
    """Takes every partition it can lease and keeps them while its database session lives.

    `run()` connects, tries the locks of the partitions it does not hold every `check_seconds`
    (the same query is the session's heartbeat), and on losing the connection drops every lease
    and connects again with backoff, for as long as it runs. `held` is what it holds now;
    `changed` is set whenever that changes. Cancelling `run()` closes the connection, which is
    what hands the partitions to the next process.
    """

    def __init__(self, database_url: str, group: str, partitions: Callable[[], Iterable[TopicPartition]], *,
                 check_seconds: float = 0.5, max_backoff: float = 5.0) -> None:
        self._database_url = database_url
        self._group = group
        self._partitions = partitions  # every partition of the command topics, as now known
        self._check_seconds = check_seconds
        self._max_backoff = max_backoff
        self.held: frozenset[TopicPartition] = frozenset()
        self.changed = asyncio.Event()
        self.checks = 0  # rounds of lock attempts (or heartbeats) made so far
        self._waiting_logged = False

    async def run(self) -> None:
        backoff = Backoff(self._max_backoff)
        while True:
            try:
                connection = await asyncpg.connect(self._database_url, server_settings=KEEPALIVES)
            except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as error:
                log.warning("partition leases: cannot connect to the database", error=str(error))
            else:
                backoff.reset()
                try:
                    while True:
                        await self._take(connection)
                        await asyncio.sleep(self._check_seconds)
                except TRANSIENT_DB_ERRORS as error:
                    log.warning("partition leases lost with the database session", error=str(error),
                                partitions=len(self.held))
                finally:
                    self._hold(frozenset())
                    try:  # a goodbye, so the server does not log a lost client; the locks go either way
                        await asyncio.wait_for(connection.close(), 2)
                    except Exception:
                        connection.terminate()
            await asyncio.sleep(backoff.next())

    async def _take(self, connection: asyncpg.Connection) -> None:
        wanted = {lease_key(self._group, tp): tp for tp in self._partitions() if tp not in self.held}
        # Not traced: with tracing on, a check twice a second would be a new trace each time.
        with suppress_instrumentation():
            if not wanted:
                await connection.fetchval("SELECT 1")  # heartbeat: a dead session is noticed here
                self.checks += 1
                return
            rows = await connection.fetch(
                "SELECT key FROM unnest($1::bigint[]) AS key WHERE pg_try_advisory_lock(key)", list(wanted))
        self.checks += 1
        taken = frozenset(wanted[row["key"]] for row in rows)
        if taken:
            self._hold(self.held | taken)
        elif not self.held and not self._waiting_logged:
            log.info("partition leases held by another process; standing by", group=self._group)
            self._waiting_logged = True

    def _hold(self, held: frozenset[TopicPartition]) -> None:
        if held != self.held:
            log.info("partition leases", held=sorted(f"{tp.topic}:{tp.partition}" for tp in held),
                     taken=len(held - self.held), dropped=len(self.held - held))
            self.held = held
            self._waiting_logged = False
            PARTITIONS_LEASED.set(len(held))
            self.changed.set()
