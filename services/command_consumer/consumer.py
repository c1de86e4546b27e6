"""The Kafka loop: each assigned partition has at most one batch in hand, and gets its next batch
as soon as it is free.

Three pieces, as in aiokafka's local-state consumer example: the rebalance listener
(`_CommitOnRevoke`), the batches in hand (`_in_hand`, each run by `BatchPipeline`), and the fetch
loop (`CommandConsumer.run`). Python work (parsing, deciding, publishing) of one batch overlaps
the database work of the others, and a slow partition holds back only itself and the partitions
sharing its batch. A batch's outcomes are published while its partitions' next batch is applied
(BatchPipeline), and offsets are committed by `OffsetCommitter`: both off the batches' path.

aiokafka directly rather than a FastStream subscriber: the consumer needs whole per-partition
batches in one transaction, parallel partitions, manual commits strictly after the outcomes are
durable, and commit-on-revoke; FastStream hides those behind its per-message handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from services.command_consumer.leases import PartitionLeases
from services.command_consumer.metrics import SHARED_BATCH_SPLITS
from services.command_consumer.offsets import OffsetCommitter
from services.command_consumer.ordering import SegmentBarrier
from services.command_consumer.parsing import ParsedRecord
from services.command_consumer.pipeline import BatchPipeline, SharedBatchBlocked
from services.command_consumer.publishing import OutcomePublisher
from services.command_consumer.removals import SegmentRemover
from shared.kafka import create_producer, kafka_options, start_client
from shared.settings import ConsumerSettings, KafkaSettings

log = structlog.get_logger("command_consumer")


class _CommitOnRevoke(ConsumerRebalanceListener):
    def __init__(self, consumer: CommandConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        # Finish the batches in hand, and commit their offsets, before the partitions move.
        await self._consumer.finish_in_hand()
        log.info("partitions revoked", partitions=[f"{tp.topic}:{tp.partition}" for tp in revoked])

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned", partitions=[f"{tp.topic}:{tp.partition}" for tp in assigned])


class CommandConsumer:
    """Consumes both command topics and applies every record exactly once in effect, in
    per-partition order, until `stop()`: as one member of the consumer group, or owning the
    partitions it can lease (CONSUMER_PARTITION_OWNERSHIP=lease, services/command_consumer/leases.py).

    `run()` returns after a graceful stop (the batches in hand are finished and committed), and
    raises PoisonGuardTripped or DatabaseUnavailable when a batch could not be applied; the batches
    in hand are then abandoned (rolled back, offsets not committed) and a restart resumes at the
    first command not applied.
    """

    def __init__(self, kafka: KafkaSettings, settings: ConsumerSettings, pool: asyncpg.Pool, *,
                 outcome_retention: int, database_url: str) -> None:
        self.kafka = kafka
        self.settings = settings
        self.stopping = asyncio.Event()
        self._in_hand: dict[TopicPartition, asyncio.Task] = {}  # at most one batch per partition
        self._freed = asyncio.Event()  # a partition finished its batch
        self._segment_batches = SegmentBarrier()  # what user batches may wait for
        self.kafka_consumer = AIOKafkaConsumer(
            **kafka_options(kafka),
            group_id=kafka.consumer_group,
            group_instance_id=settings.consumer_group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
            max_partition_fetch_bytes=kafka.max_command_bytes * 3,
            fetch_max_bytes=max(52_428_800, kafka.max_command_bytes * 3),
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
            max_poll_interval_ms=900_000,
        )
        self.producer = create_producer(kafka)
        self._committer = OffsetCommitter(self.kafka_consumer)
        self._committing: asyncio.Task | None = None
        publisher = OutcomePublisher(self.producer, kafka.results_topic, kafka.dlq_topic)
        self._pipeline = BatchPipeline(settings, kafka, outcome_retention, pool, self.kafka_consumer, publisher,
                                       self._committer)
        # Removals queued before the chunk was set to 0 are still finished, in chunks of the default.
        self._remover = SegmentRemover(pool, publisher, self._committer, settings.consumer_segment_removal_chunk
                                       or type(settings).model_fields["consumer_segment_removal_chunk"].default)
        self._pipeline.on_removal_queued = self._remover.wake
        self._removing: asyncio.Task | None = None
        self.leases: PartitionLeases | None = None
        self._known_partitions: set[TopicPartition] = set()
        if settings.consumer_partition_ownership == "lease":
            self.leases = PartitionLeases(database_url, kafka.consumer_group,
                                          self._command_partitions,
                                          check_seconds=settings.consumer_lease_check_seconds,
                                          max_backoff=settings.db_retry_max_backoff_seconds)

    async def run(self) -> None:
        try:
            await start_client(self.producer, self.kafka)
            await start_client(self.kafka_consumer, self.kafka)
        except BaseException:
            await self.kafka_consumer.stop()
            await self.producer.stop()
            raise
        self._committing = asyncio.create_task(self._committer.run())
        self._removing = asyncio.create_task(self._remover.run())
        leasing = None
        if self.leases is None:
            self.kafka_consumer.subscribe(list(self.kafka.command_topics), listener=_CommitOnRevoke(self))
        else:
            leasing = asyncio.create_task(self.leases.run())
        log.info("consuming", topics=list(self.kafka.command_topics), group=self.kafka.consumer_group,
                 ownership=self.settings.consumer_partition_ownership)
        graceful = False
        try:
            while not self.stopping.is_set():
                self._reap()
                self._pipeline.behind.report_now_and_then()
                for helper in (leasing, self._committing, self._removing):
                    if helper is not None and helper.done():
                        helper.result()  # raises what ended it: neither stops silently
                if self.leases is not None and self.leases.changed.is_set():
                    await self._follow_leases()
                idle = [tp for tp in self.kafka_consumer.assignment() if tp not in self._in_hand]
                if idle:
                    fetched = await self._fetch_first(idle)
                elif self._in_hand:
                    await self._wait_freed(timeout=0.2)
                    continue
                elif self.leases is not None:  # no lease held: wait for one
                    await self._wait_leases_changed(timeout=0.2)
                    continue
                else:  # not assigned yet: getmany waits for the group
                    fetched = await self.kafka_consumer.getmany(timeout_ms=200,
                                                                max_records=self.settings.consumer_max_batch)
                if fetched:
                    # The other free partitions' records came in the same fetch response: hand them
                    # out together, so that segment batches go first.
                    for tp in self.kafka_consumer.assignment():
                        if tp not in fetched and tp not in self._in_hand:
                            fetched.update(await self.kafka_consumer.getmany(
                                tp, timeout_ms=0, max_records=self.settings.consumer_max_batch))
                    self._dispatch(fetched)
            graceful = True
        finally:
            try:
                if graceful:  # finish the batches in hand; one that failed meanwhile still says so
                    await self.finish_in_hand()
                    self._reap()
                    if self._committing.done():
                        self._committing.result()  # the last commits failed: say so
            finally:
                # Failing or cancelled: abandon what is in hand (rolled back, offsets not committed).
                in_hand = {*self._in_hand.values(), *self._pipeline.publishing()}
                for task in in_hand:
                    task.cancel()
                self._committing.cancel()
                self._removing.cancel()  # a chunk in hand rolls back; the next process goes on from there
                await asyncio.gather(*in_hand, self._committing, self._removing, return_exceptions=True)
                await self.kafka_consumer.stop()
                await self.producer.stop()
                if leasing is not None:  # last: the leases pass to the next process once all is committed
                    leasing.cancel()
                    await asyncio.gather(leasing, return_exceptions=True)
                log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def finish_in_hand(self) -> None:
        """Wait for every batch in hand to be applied and published (or to fail), and for their
        offsets to be committed."""
        # Until none is left: a shared batch that splits hands its partitions to new batches, and
        # a batch applied starts its publish.
        while pending := {task for task in (*self._in_hand.values(), *self._pipeline.publishing())
                          if not task.done()}:
            await asyncio.wait(pending)
        if self._committing is not None and not self._committing.done():
            flushed = asyncio.ensure_future(self._committer.flush())
            await asyncio.wait({flushed, self._committing}, return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()  # a no-op when it has returned; the committer's error is raised by the loop

    def _command_partitions(self) -> set[TopicPartition]:
        """Every partition of the command topics seen in the client's metadata. Remembered: the
        client refreshes only the topics it is assigned, and a topic's partitions never go away."""
        for topic in self.kafka.command_topics:
            self._known_partitions.update(
                TopicPartition(topic, partition) for partition in self.kafka_consumer.partitions_for_topic(topic) or ())
        return self._known_partitions

    async def _follow_leases(self) -> None:
        """Consume exactly the leased partitions. The batches in hand finish (and commit) first,
        as before a group rebalance: assigning anew starts every partition at its committed offset."""
        self.leases.changed.clear()
        await self.finish_in_hand()
        self._reap()
        self.kafka_consumer.assign(sorted(self.leases.held))
        log.info("partitions assigned", partitions=[f"{tp.topic}:{tp.partition}" for tp in sorted(self.leases.held)])

    async def _wait_leases_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.leases.changed.wait(), timeout)

    def _reap(self) -> None:
        """Forget finished batches; a batch or a publish that failed stops the consumer with its error."""
        for tp, task in list(self._in_hand.items()):
            if task.done():
                del self._in_hand[tp]
                task.result()
        for task in self._pipeline.publishing():
            if task.done():
                task.result()

    async def _wait_freed(self, timeout: float) -> None:
        self._freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), timeout)

    async def _fetch_first(self, idle: list[TopicPartition]) -> dict[TopicPartition, list[Any]]:
        """Records of the free partitions, or nothing once a busy partition is freed first.

        Cancelling getmany while it waits drains nothing (records leave aiokafka's buffer only
        in the step that returns them), so no record is lost by giving up on it.
        """
        fetch = asyncio.ensure_future(self.kafka_consumer.getmany(
            *idle, timeout_ms=200, max_records=self.settings.consumer_max_batch))
        if not self._in_hand:
            return await fetch
        self._freed.clear()
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            await asyncio.wait({fetch, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            fetch.cancel()  # a no-op when it has returned
        try:
            return await fetch
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this loop is being cancelled, not just the fetch
                raise
            return {}

    def _dispatch(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Start batches for the fetched records: segment batches first, and user batches wait for
        the segment batches in hand that name a segment they name (a segment and a user command
        fetched together apply in that order; there is no order across topics, but this is the
        one producers expect; services/command_consumer/ordering.py).

        User partitions fetched together share a batch while their records add up to at most
        CONSUMER_COMBINE_RECORDS: under light load a fetch brings a few records of many
        partitions, and one transaction, one publish and one commit for all of them cost far less
        than one each. A partition with more records than that has a batch of its own, so under
        load the partitions' transactions run in parallel as before; and a shared batch that meets
        a row lock splits (SharedBatchBlocked), so a lock holds back only its own partition.
        Segment commands are few: each segment partition keeps a batch of its own."""
        segments_topic = self.kafka.segments_commands_topic
        for tp in sorted(tp for tp in fetched if tp.topic == segments_topic):
            self._segment_batches.started(self._start({tp: fetched[tp]}), fetched[tp])
        limit = self.settings.consumer_combine_records
        shared: dict[TopicPartition, list[Any]] = {}
        size = 0  # records in `shared`
        for tp in sorted(tp for tp in fetched if tp.topic != segments_topic):
            records = fetched[tp]
            barrier = self._segment_batches.for_users(records)
            if len(records) > limit or barrier:  # alone: a partition that waits holds back no other
                self._start({tp: records}, barrier)
                continue
            if shared and size + len(records) > limit:
                self._start(shared)
                shared, size = {}, 0
            shared[tp] = records
            size += len(records)
        if shared:
            self._start(shared)

    def _start(self, batches: dict[TopicPartition, list[Any]], barrier: Collection[asyncio.Task] = (),
               parsed: list[ParsedRecord] | None = None) -> asyncio.Task:
        task = asyncio.create_task(self._handle(batches, barrier, parsed))
        for tp, records in batches.items():
            self._in_hand[tp] = task
            self._pipeline.behind.fetched(tp, records[0].offset, records[0].timestamp)
        return task

    async def _handle(self, batches: dict[TopicPartition, list[Any]], barrier: Collection[asyncio.Task],
                      parsed: list[ParsedRecord] | None) -> None:
        try:
            if barrier:
                await asyncio.wait(barrier)
            await self._pipeline.run(batches, parsed)
        except SharedBatchBlocked as blocked:
            SHARED_BATCH_SPLITS.inc()
            log.info("a shared batch met a row lock: its partitions go on alone",
                     partitions=[f"{tp.topic}:{tp.partition}" for tp in batches])
            for tp, records in batches.items():
                self._start({tp: records}, (), blocked.parsed[tp])
        finally:
            self._freed.set()
