"""A deleted segment's explicit members removed in chunks, after the batch that deleted it.

The command's own transaction marks the segment deleted and queues its removal
(segment_removals); from then on no read or command sees the segment, and the commands behind it
in its partition go on. Here, one transaction per chunk removes at most CONSUMER_SEGMENT_REMOVAL_CHUNK
members with the history of exactly those rows, and adds them to the removal's count; the chunk
that finds the last members also stores the command's outcome and marks the removal done. A
crash rolls back the chunk in hand and nothing else: the next chunk starts from the rows left, so
no member leaves twice or not at all. Once the outcome is published the removal's row goes and the
command's offset is released (OffsetCommitter.hold): until then a restart delivers the command
again, which finds its removal still queued and holds the offset again.

Every consumer process runs one remover; a removal is worked by one at a time (its row locked,
SKIP LOCKED), and a process holding an offset whose removal another process finished releases it
when it sees the row gone.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import structlog
from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.command_consumer import repository
from services.command_consumer.metrics import SEGMENT_MEMBERS_REMOVED
from services.command_consumer.offsets import OffsetCommitter
from services.command_consumer.publishing import OutcomePublisher
from services.command_consumer.segments import deleted_result
from shared.db import TRANSIENT_DB_ERRORS, Backoff, writable
from shared.outcomes import OUTCOME_COLUMNS, OutcomeRow, Status

log = structlog.get_logger("command_consumer")

NEXT_SQL = """
SELECT command_id, segment_id, slug, deleted_at, removed, last_added_at, last_user_id, done_at, traceparent, outcome
FROM segment_removals
ORDER BY done_at IS NULL, deleted_at, command_id
LIMIT 1 FOR UPDATE SKIP LOCKED
"""


def _draft(stored: dict) -> OutcomeRow:
    values = {name: stored.get(name) for name in OUTCOME_COLUMNS}
    for name in ("processed_at", "recorded_at"):
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return OutcomeRow(**values)


class SegmentRemover:
    def __init__(self, pool: asyncpg.Pool, publisher: OutcomePublisher, committer: OffsetCommitter,
                 chunk: int, poll_seconds: float = 1.0) -> None:
        self._pool = pool
        self._publisher = publisher
        self._committer = committer
        self._chunk = chunk
        self._poll_seconds = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A removal was queued: start on it now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Remove until cancelled. A database that does not answer is waited for, as by batches.
        Its statements make no spans: a poll every second would be a trace each time in the
        operators' tracing backend, and a removal's chunks belong to no request."""
        with suppress_instrumentation():
            await self._run()

    async def _run(self) -> None:
        backoff = Backoff(5.0)
        while True:
            try:
                worked = await self._step()
                if not worked:
                    await self._release_finished_elsewhere()
                backoff.reset()
            except TRANSIENT_DB_ERRORS as error:
                wait = backoff.next()
                log.warning("database unavailable, removal retrying", error=repr(error), retry_in=round(wait, 3))
                await asyncio.sleep(wait)
                continue
            if worked:
                await asyncio.sleep(0)  # one chunk, then whatever else this process has to do
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            except TimeoutError:
                pass

    async def _step(self) -> bool:
        """One chunk of the oldest removal nobody else is working on, or the publication of one
        finished; False when there was nothing to do."""
        async with writable(self._pool) as conn:
            async with conn.transaction():
                job = await conn.fetchrow(NEXT_SQL)
                if job is None:
                    return False
                if job["done_at"] is None:
                    after = (job["last_added_at"], job["last_user_id"]) if job["last_added_at"] else None
                    removed, more, last = await repository.remove_chunk(
                        conn, job["segment_id"], job["slug"], job["deleted_at"], job["command_id"], self._chunk, after)
                    total = job["removed"] + removed
                    SEGMENT_MEMBERS_REMOVED.inc(removed)
                    if more:
                        await conn.execute("UPDATE segment_removals SET removed = $2, last_added_at = $3, "
                                           "last_user_id = $4 WHERE command_id = $1",
                                           job["command_id"], total, *last)
                        return True
                    now = datetime.now(UTC)
                    outcome = _draft(job["outcome"])._replace(status=str(Status.APPLIED), processed_at=now,
                                                               result=deleted_result(job["slug"], total))
                    await repository.write_batch(conn, [], [], [outcome], now)
                    await conn.execute("UPDATE segment_removals SET removed = $2, done_at = $3 WHERE command_id = $1",
                                       job["command_id"], total, now)
                    log.info("segment members removed", slug=job["slug"], command_id=job["command_id"],
                             removed=total)
                else:
                    outcome = await repository.fetch_outcomes(conn, [job["command_id"]])
                    outcome = outcome.get(job["command_id"])
            token = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        if outcome is not None:
            await self._publisher.publish_outcome(outcome, token, job["traceparent"])
        async with writable(self._pool) as conn:
            await conn.execute("DELETE FROM segment_removals WHERE command_id = $1 AND done_at IS NOT NULL",
                               job["command_id"])
        self._committer.release({job["command_id"]})
        return True

    async def _release_finished_elsewhere(self) -> None:
        held = self._committer.held()
        if not held:
            return
        async with writable(self._pool) as conn:
            queued = {row["command_id"] for row in await conn.fetch(
                "SELECT command_id FROM segment_removals WHERE command_id = ANY($1::text[])", sorted(held))}
        if held - queued:
            self._committer.release(held - queued)
