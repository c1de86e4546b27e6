"""What the consumer tells operators: Prometheus metrics, and a log line for every command that
was not simply applied (every command at DEBUG), with its trace and position. MetricsObserver
is the batch observer (observers.py) that records them."""

from __future__ import annotations

import collections
import contextlib
import logging
import time

import structlog
from aiokafka import TopicPartition

from services.command_consumer import metrics
from services.command_consumer.batch import Processed
from services.command_consumer.observers import BatchResult
from services.command_consumer.parsing import InvalidRecord, ParsedRecord
from shared.metrics import observe_all
from shared.outcomes import ErrorCode

log = structlog.get_logger("command_consumer")


def batch_applied(processed: list[Processed], seconds: float, durable_at: float, published_at: float) -> None:
    """A batch is durable and its outcomes acknowledged: its size, duration, per-command latency
    (to durable, and to published) and outcomes."""
    metrics.BATCH_DURATION.observe(seconds)
    metrics.BATCH_SIZE.observe(len(processed))
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    debug = log.is_enabled_for(logging.DEBUG)
    produced_at = []  # seconds, of the records applied here for the first time
    for item in processed:
        outcome, record = item.outcome, item.parsed.record
        if item.replayed:
            metrics.REPLAYED.inc()
        else:
            counts[(outcome.type or "unknown", outcome.status)] += 1
            if record.timestamp_ms is not None:
                produced_at.append(record.timestamp_ms / 1000)
            if isinstance(item.parsed, InvalidRecord):
                metrics.DLQ_RECORDS.labels(item.parsed.code).inc()
            elif outcome.error and outcome.error["code"] == ErrorCode.TOO_OLD:
                metrics.TOO_OLD.inc()
        if outcome.status != "applied" or item.replayed or item.pending or debug:
            _log_outcome(item)
    for (command_type, status), count in counts.items():
        metrics.COMMANDS.labels(command_type, status).inc(count)
    observe_all(metrics.COMMAND_LATENCY, [max(0.0, durable_at - at) for at in produced_at])
    observe_all(metrics.PUBLISHED_LATENCY, [max(0.0, published_at - at) for at in produced_at])


def lag(tp: TopicPartition, highwater: int | None, next_offset: int) -> None:
    if highwater is not None:
        metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))


def retry(stalled: dict[str, int], attempt: int, error: BaseException) -> None:
    """A batch transaction failed; `stalled`: the first offset of each partition ("topic:partition")
    of the batch, where each stays until it succeeds."""
    metrics.DB_RETRIES.inc()
    log.warning("batch transaction failed, will retry", stalled_at=stalled, attempt=attempt, error=repr(error))


class TimeBehind:
    """Per partition, the records fetched and not yet published, by the first offset and the
    timestamp of each batch; `report()` sets each partition's gauge to the oldest one's age, so a
    batch stuck in the database shows as a partition falling further behind while it waits."""

    REPORT_EVERY = 1.0  # seconds: the loop turns far more often than a scrape or an alert needs

    def __init__(self) -> None:
        self._waiting: dict[TopicPartition, dict[int, float]] = collections.defaultdict(dict)
        self._reported_at = 0.0

    def fetched(self, tp: TopicPartition, first_offset: int, timestamp_ms: int | None) -> None:
        if timestamp_ms is not None:
            self._waiting[tp].setdefault(first_offset, timestamp_ms / 1000)

    def published(self, tp: TopicPartition, last_offset: int) -> None:
        waiting = self._waiting[tp]
        for first in [first for first in waiting if first <= last_offset]:
            del waiting[first]

    def report_now_and_then(self) -> None:
        """`report()` at most once every REPORT_EVERY seconds: what the consumer's loop calls."""
        if time.monotonic() - self._reported_at >= self.REPORT_EVERY:
            self.report()

    def report(self, now: float | None = None) -> None:
        self._reported_at = time.monotonic()
        now = time.time() if now is None else now
        for tp, waiting in self._waiting.items():
            oldest = min(waiting.values(), default=None)
            metrics.TIME_BEHIND.labels(tp.topic, str(tp.partition)).set(max(0.0, now - oldest) if oldest else 0.0)


class MetricsObserver:
    """Counts and times every batch; lag is read from the consumer's view of each partition's end."""

    def __init__(self, highwater, behind: TimeBehind | None = None) -> None:
        self._highwater = highwater  # TopicPartition -> the partition's end offset, or None
        self.behind = behind or TimeBehind()

    def observe(self, partitions: list[TopicPartition], parsed: list[ParsedRecord]) -> MetricsObserver:
        return self  # nothing of its own per batch

    def applying(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    publishing = applying

    def applied(self, result: BatchResult) -> None:
        pass

    def outcome_contexts(self) -> None:
        return None

    def published(self, result: BatchResult) -> None:
        batch_applied(result.processed, result.applied_in, result.durable_at, result.published_at)
        for tp, next_offset in result.next_offsets.items():
            lag(tp, self._highwater(tp), next_offset)
            self.behind.published(tp, next_offset - 1)
        self.behind.report(result.published_at)
        metrics.LAST_PROGRESS.set(result.published_at)

    def retrying(self, stalled: dict[str, int], attempt: int, error: BaseException) -> None:
        retry(stalled, attempt, error)


def _log_outcome(item: Processed) -> None:
    record, outcome = item.parsed.record, item.outcome
    error = outcome.error or {}
    traceparent = record.header("traceparent")
    fields = {"command_id": outcome.command_id, "type": outcome.type, "status": outcome.status, "actor": outcome.actor,
              "code": error.get("code"), "reason": error.get("message"),
              "traceparent": traceparent.decode(errors="replace") if traceparent else None,
              "topic": record.topic, "partition": record.partition, "offset": record.offset}
    if item.pending:
        log.info("command seen again, its segment's members still leaving: outcome when they have" if item.replayed
                 else "segment deleted, its members leave in chunks: outcome when they have", **fields)
    elif item.replayed:
        log.info("command seen again, stored outcome re-published", **fields)
    elif outcome.status == "invalid":
        log.warning("dead-lettered", **fields)
    elif error.get("code") == ErrorCode.TOO_OLD:
        log.warning("command older than the outcome window rejected, not applied", **fields)
    elif outcome.status == "rejected":
        log.info("command rejected", **fields)
    else:
        log.debug("command applied", **fields)
