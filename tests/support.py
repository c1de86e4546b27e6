"""Helpers for tests that drive the real pipeline: publish commands, run the consumer, await outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.command_consumer.bootstrap import build_consumer
from services.command_consumer.consumer import CommandConsumer
from shared.kafka import kafka_options
from shared.settings import Settings


class Publisher:
    """Publishes commands the way producers do: JSON value, key = slug or user id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(**kafka_options(settings), acks="all",
                                         max_request_size=4 * 1024 * 1024)

    async def __aenter__(self) -> Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def segment(self, command: dict[str, Any], **kwargs):
        return await self.raw(self.settings.segments_commands_topic, command, key=command.get("slug"), **kwargs)

    async def user(self, command: dict[str, Any], **kwargs):
        return await self.raw(self.settings.assignments_commands_topic, command,
                              key=str(command.get("user_id")), **kwargs)

    async def users(self, commands: list[dict[str, Any]]) -> None:
        """Many user commands, enqueued one after the other (so per-key order is the list's order),
        then acknowledged together."""
        deliveries = [await self.producer.send(self.settings.assignments_commands_topic, orjson.dumps(c),
                                               key=str(c["user_id"]).encode()) for c in commands]
        await asyncio.gather(*deliveries)

    async def raw(self, topic: str, value: dict | bytes | None, key: str | bytes | None = None,
                  headers: list[tuple[str, bytes]] | None = None):
        if isinstance(value, dict):
            value = orjson.dumps(value)
        if isinstance(key, str):
            key = key.encode()
        return await self.producer.send_and_wait(topic, value, key=key, headers=headers)


@contextlib.asynccontextmanager
async def running_consumer(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[CommandConsumer]:
    consumer = build_consumer(settings, pool)
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def rows_locked(settings: Settings, query: str, *args) -> AsyncIterator[None]:
    """The rows `query` (a SELECT … FOR UPDATE) locks, held from another connection as a long
    transaction would hold them, until the block ends."""
    blocker = await asyncpg.connect(settings.database_url)
    try:
        async with blocker.transaction():
            await blocker.execute(query, *args)
            yield
    finally:
        await blocker.close()


def memberships_locked(settings: Settings, user_id: int):
    """A user's memberships row-locked: the consumer row-locks the memberships a batch decides
    about, so that batch waits."""
    return rows_locked(settings, "SELECT 1 FROM memberships WHERE user_id = $1 FOR UPDATE", user_id)


def segment_locked(settings: Settings, slug: str):
    """A live segment's row locked: a segment command on it (a deletion) waits, its batch in hand."""
    return rows_locked(settings, "SELECT 1 FROM segments WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE", slug)


async def wait_for_outcomes(pool: asyncpg.Pool, command_ids: list[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await pool.fetch("SELECT command_id, status, error, result FROM command_outcomes "
                                "WHERE command_id = ANY($1::text[])", command_ids)
        if len(rows) == len(set(command_ids)) or time.monotonic() > deadline:
            found = {row["command_id"]: dict(row) for row in rows}
            missing = set(command_ids) - set(found)
            assert not missing, f"no outcome after {timeout}s for {sorted(missing)[:10]}"
            return found
        await asyncio.sleep(0.05)


async def create_segments(publish: Publisher, pool: asyncpg.Pool, segments: list[dict]) -> None:
    """Segment commands published, and applied before anything that names them is."""
    for command in segments:
        await publish.segment(command)
    await wait_for_outcomes(pool, [c["command_id"] for c in segments])


async def wait_for_count(pool: asyncpg.Pool, query: str, at_least: int, timeout: float = 60.0) -> None:
    """Until a count query reaches `at_least` (rows written by another task or process)."""
    async with asyncio.timeout(timeout):
        while await pool.fetchval(query) < at_least:  # noqa: ASYNC110 - polling another process's writes
            await asyncio.sleep(0.05)


async def read_topic(settings: Settings, topic: str, count: int, timeout: float = 20.0, quiet: float | None = None
                     ) -> list:
    """Every record of a topic from the beginning, until `count` have arrived (or, with `quiet`,
    until none has for that many seconds: a topic nothing writes to any more, read to its end)."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for items in batch.values():
                records.extend(items)
                last = time.monotonic()
            if quiet is not None and time.monotonic() - last > quiet:
                break
        return records
    finally:
        await consumer.stop()


def header(record, name: str) -> str | None:
    return next((value.decode() for key, value in record.headers if key == name), None)


async def history(pool: asyncpg.Pool, user_id: int | None = None) -> list[tuple]:
    rows = await pool.fetch(
        "SELECT user_id, segment_slug, operation, source, reason FROM membership_history "
        "WHERE $1::bigint IS NULL OR user_id = $1 ORDER BY id", user_id)
    return [tuple(row) for row in rows]


def service_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a service process configured like `settings`."""
    import os

    return {**os.environ, **settings.to_env(), **overrides}


def ancestry(*paths: Path) -> dict[str, tuple[int, int, int]]:
    """Mode, owner and group of each path and of every directory above it."""
    found = {}
    for path in paths:
        for directory in (path, *path.parents):
            info = directory.stat()
            found[str(directory)] = (info.st_mode, info.st_uid, info.st_gid)
    return found
