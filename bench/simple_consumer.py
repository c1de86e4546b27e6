"""The baseline: the simplest correct consumer loop, one transaction per command.

Same validation, same inbox, same history and outcomes as the real consumer (explicit memberships
only: the benchmark has no rollout segments), but one record at a time and one statement per row.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from services.command_consumer.parsing import RecordRef, ValidCommand, parse_record
from shared.kafka import create_producer, kafka_options
from shared.outcomes import format_timestamp
from shared.settings import Settings


async def apply_one(conn: asyncpg.Connection, parsed: ValidCommand) -> dict:
    command, now = parsed.command, datetime.now(UTC)
    record = parsed.record
    async with conn.transaction():
        stored = await conn.fetchrow("SELECT status, result, error FROM command_outcomes WHERE command_id = $1",
                                     parsed.command_id)
        if stored:
            return dict(stored)
        rows = await conn.fetch("SELECT id, slug FROM segments WHERE slug = ANY($1::text[]) AND deleted_at IS NULL",
                                command.add + command.remove)
        ids = {row["slug"]: row["id"] for row in rows}
        status, result, error = "applied", None, None
        missing = [slug for slug in command.add if slug not in ids]
        if missing:
            status, error = "rejected", {"code": "segment_not_found", "message": ", ".join(missing)}
        else:
            await conn.execute("INSERT INTO users VALUES ($1, $2) ON CONFLICT DO NOTHING", command.user_id, now)
            added, removed = [], []
            expires_at = command.expiry_from(now)
            for slug in command.add:
                inserted = await conn.fetchval(
                    "INSERT INTO memberships VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, segment_id) "
                    "DO UPDATE SET expires_at = EXCLUDED.expires_at RETURNING xmax = 0",
                    command.user_id, ids[slug], now, expires_at)
                if inserted:
                    await conn.execute("INSERT INTO membership_history (user_id, segment_slug, operation, "
                                       "executed_at, source, reason, command_id) "
                                       "VALUES ($1, $2, 'I', $3, 'manual', 'manual', $4)",
                                       command.user_id, slug, now, parsed.command_id)
                added.append(slug)
            for slug in command.remove:
                if slug in ids and await conn.fetchval(
                        "DELETE FROM memberships WHERE user_id = $1 AND segment_id = $2 RETURNING 1",
                        command.user_id, ids[slug]):
                    await conn.execute("INSERT INTO membership_history (user_id, segment_slug, operation, "
                                       "executed_at, source, reason, command_id) "
                                       "VALUES ($1, $2, 'D', $3, 'manual', 'manual', $4)",
                                       command.user_id, slug, now, parsed.command_id)
                    removed.append(slug)
            result = {"added": added, "removed": removed}
        await conn.execute("INSERT INTO command_outcomes VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                           parsed.command_id, command.type, status, error, result, now, record.topic,
                           record.partition, record.offset)
    return {"command_id": parsed.command_id, "status": status, "result": result, "error": error,
            "processed_at": format_timestamp(now)}


async def run_simple_consumer(settings: Settings, pool: asyncpg.Pool, stop_after: int, progress=None) -> int:
    consumer = AIOKafkaConsumer(settings.assignments_commands_topic, **kafka_options(settings),
                                group_id=settings.consumer_group + "-simple", enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=10)
    producer = create_producer(settings)
    await consumer.start()
    await producer.start()
    done = 0
    try:
        async for message in consumer:
            parsed = parse_record(RecordRef(message.topic, message.partition, message.offset, message.key,
                                            message.value), settings.segments_commands_topic,
                                  settings.max_command_bytes)
            async with pool.acquire() as conn:
                outcome = await apply_one(conn, parsed)
            await producer.send_and_wait(settings.results_topic, orjson.dumps(outcome),
                                         key=parsed.command_id.encode())
            await consumer.commit()
            done += 1
            if progress:
                progress.update(done)
            if done >= stop_after:
                return done
    finally:
        await consumer.stop()
        await producer.stop()
    return done
