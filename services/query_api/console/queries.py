"""What the console reads beyond the API's own reads: segments with their member counts, a user's
month of history as rows, an import's outcomes, and the trace a command's record carries."""

from __future__ import annotations

import asyncio
import contextlib
import csv
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.query_api.console.import_tokens import ImportJob
from services.query_api.reports import check_month_kept, stream_report
from shared.kafka import kafka_options, start_client
from shared.membership import unexpired
from shared.settings import KafkaSettings

# Explicit members not yet expired, and users the rollout would cover but who were removed.
SEGMENTS_SQL = f"""
SELECT s.slug, s.percent, s.description, s.created_at,
       (SELECT count(*) FROM memberships m
        WHERE m.segment_id = s.id AND {unexpired("m")}) AS members,
       (SELECT count(*) FROM rollout_exclusions x WHERE x.segment_id = s.id) AS excluded
FROM segments s
WHERE s.deleted_at IS NULL
ORDER BY s.slug
"""
# How many users the service knows: counted while that is cheap, the planner's estimate beyond.
KNOWN_USERS_SQL = """
SELECT CASE WHEN c.reltuples > 1000000 THEN c.reltuples::bigint ELSE (SELECT count(*) FROM users) END
FROM pg_class c WHERE c.oid = 'users'::regclass
"""


@dataclass(frozen=True, slots=True)
class SegmentRow:
    slug: str
    percent: Decimal
    description: str | None
    created_at: object
    members: int
    excluded: int
    rollout_users: int  # the known users the rollout is expected to cover (it hashes uniformly)


async def segments(pool: asyncpg.Pool) -> tuple[list[SegmentRow], int]:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(SEGMENTS_SQL)
        known = await conn.fetchval(KNOWN_USERS_SQL) or 0
    return [SegmentRow(row["slug"], row["percent"], row["description"], row["created_at"], row["members"],
                       row["excluded"], round(known * float(row["percent"]) / 100)) for row in rows], known


async def user_history(pool: asyncpg.Pool, user_id: int, year: int, month: int, limit: int,
                       ) -> tuple[list[dict[str, str]], bool]:
    """The user's rows of the month's report (the CSV's rows), at most `limit`, and whether there
    were more. MonthDropped if retention dropped the month."""
    text = bytearray()
    async with pool.acquire() as conn:
        await check_month_kept(conn, year, month)
        async with contextlib.aclosing(stream_report(conn, year, month, user_id, release=_nothing)) as chunks:
            async for chunk in chunks:
                text += chunk
                if text.count(b"\n") > limit + 1:  # the header, `limit` rows and one more
                    break
    lines = text.decode().split("\n")[:limit + 2]
    complete = [line for line in lines[:limit + 1] if line]
    rows = list(csv.DictReader(complete))
    return rows, len(lines) == limit + 2 and bool(lines[-1])


async def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class ImportProgress:
    total: int  # rows published
    counts: Counter  # outcome status -> rows
    problems: list[asyncpg.Record]  # the first rows not applied (line, command_id, status, error), once all are in

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> bool:
        return self.processed >= self.total


IMPORT_OUTCOMES_SQL = """
SELECT status, count(DISTINCT command_id) AS n FROM command_outcomes WHERE command_id = ANY($1::text[]) GROUP BY status
"""


# The rows not applied, lowest line first (the line of each command id comes with it).
IMPORT_PROBLEMS_SQL = """
SELECT i.line, i.command_id, o.status, o.error
FROM unnest($1::text[], $2::int[]) AS i(command_id, line)
CROSS JOIN LATERAL (SELECT status, error FROM command_outcomes
                    WHERE command_id = i.command_id AND status <> 'applied' LIMIT 1) AS o
ORDER BY i.line LIMIT $3
"""


async def import_progress(pool: asyncpg.Pool, job: ImportJob, problems_shown: int) -> ImportProgress:
    command_ids = job.command_ids
    rows = await pool.fetch(IMPORT_OUTCOMES_SQL, command_ids)
    counts = Counter({row["status"]: row["n"] for row in rows})
    done = sum(counts.values()) >= len(command_ids)
    problems = await pool.fetch(IMPORT_PROBLEMS_SQL, command_ids, job.lines, problems_shown) if done and (
        counts["rejected"] or counts["invalid"]) else []
    return ImportProgress(len(command_ids), counts, problems)


async def record_trace_id(kafka: KafkaSettings, topic: str, partition: int, offset: int,
                          timeout: float = 3.0) -> str | None:
    """The trace id in the `traceparent` header of the record at topic/partition/offset, if it
    has one and the record is still on the topic."""
    consumer = AIOKafkaConsumer(**kafka_options(kafka), enable_auto_commit=False, fetch_max_wait_ms=100,
                                request_timeout_ms=int(timeout * 1000) + 1000)
    try:
        await asyncio.wait_for(start_client(consumer, kafka), timeout)
        where = TopicPartition(topic, partition)
        consumer.assign([where])
        consumer.seek(where, offset)
        found = await consumer.getmany(where, timeout_ms=int(timeout * 1000), max_records=1)
    except (TimeoutError, KafkaError, OSError):
        return None
    finally:
        await consumer.stop()
    for record in found.get(where, ()):
        if record.offset != offset:
            continue
        for name, value in record.headers or ():
            if name == "traceparent":
                parts = value.decode(errors="replace").split("-")
                if len(parts) == 4 and len(parts[1]) == 32:
                    return parts[1]
    return None
