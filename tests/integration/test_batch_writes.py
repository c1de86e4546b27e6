"""A batch's writes go out as one statement while the batch is small, and its history and inbox
rows by COPY past that (repository.write_batch): both must leave exactly the same rows."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from services.command_consumer import repository
from services.command_consumer.batch import apply_batch
from services.command_consumer.parsing import RecordRef, parse_record

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TABLES = {  # every table a batch writes, in an order that makes each snapshot comparable
    "users": "user_id",
    "segments": "id",
    "memberships": "user_id, segment_id",
    "rollout_exclusions": "user_id, segment_id",
    "membership_history": "id",
    "command_outcomes": "command_id",
    "rollout_events": "id",
}

SEGMENT_BATCH = [
    {"type": "create_segment", "slug": "A", "command_id": "s-a"},
    {"type": "create_segment", "slug": "R", "percent": 100, "command_id": "s-r"},  # covers every user
]
USER_BATCHES = [
    [  # new users, entries with and without a TTL, a rollout exit (an exclusion), rejections, an invalid record
        {"type": "create_user", "user_id": 1, "command_id": "u1", "actor": "support"},
        {"type": "update_user_segments", "user_id": 2, "add": ["A"], "ttl_seconds": 3600, "command_id": "u2"},
        {"type": "update_user_segments", "user_id": 3, "add": ["A"], "remove": ["R"], "command_id": "u3"},
        {"type": "update_user_segments", "user_id": 4, "add": ["NOPE"], "command_id": "u4"},
        b"{not json",
        {"type": "update_user_segments", "user_id": 2, "remove": ["A"], "add": ["A"], "command_id": "u5"},
    ],
    [  # exits, an exclusion lifted, a membership made permanent, a repeated command id
        {"type": "update_user_segments", "user_id": 3, "add": ["R"], "remove": ["A"], "command_id": "u6"},
        {"type": "update_user_segments", "user_id": 2, "add": ["A"], "command_id": "u7"},
        {"type": "update_user_segments", "user_id": 1, "remove": ["R"], "command_id": "u8"},
        {"type": "create_user", "user_id": 1, "command_id": "u1"},
    ],
]


def parsed(settings, topic: str, commands: list, first_offset: int = 0) -> list:
    """The commands as the consumer parses their records (bytes: a record's value as it is)."""
    return [parse_record(RecordRef(topic, 0, first_offset + i, b"k",
                                   command if isinstance(command, bytes) else orjson.dumps(command), (),
                                   int(NOW.timestamp() * 1000)), settings.segments_commands_topic,
                         settings.max_command_bytes)
            for i, command in enumerate(commands)]


async def apply_all(pool, settings) -> None:
    """The segment batch, then the user batches, each one transaction."""
    batches = [parsed(settings, settings.segments_commands_topic, SEGMENT_BATCH)]
    offset = 0
    for commands in USER_BATCHES:
        batches.append(parsed(settings, settings.assignments_commands_topic, commands, offset))
        offset += len(commands)
    for batch in batches:
        async with pool.acquire() as conn:
            await apply_batch(conn, batch, settings.outcome_retention)


async def snapshot(pool) -> dict[str, list[dict]]:
    return {table: [dict(row) for row in await pool.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
            for table, order in TABLES.items()}


async def test_one_statement_and_copy_write_the_same_rows(pool, settings, monkeypatch):
    monkeypatch.setattr("services.command_consumer.batch._clock", lambda: NOW)
    written = {}
    for one_statement_rows in (10_000, 0):  # every batch in one statement; every batch's rows by COPY
        monkeypatch.setattr(repository, "ONE_STATEMENT_ROWS", one_statement_rows)
        await pool.execute(f"TRUNCATE {', '.join(TABLES)}, rollout_event_overrides RESTART IDENTITY CASCADE")
        await apply_all(pool, settings)
        written[one_statement_rows] = await snapshot(pool)

    one_statement, by_copy = written[10_000], written[0]
    assert one_statement == by_copy
    # And the scenario wrote what it is meant to exercise, in both ways.
    assert [(row["user_id"], row["registered_at"]) for row in one_statement["users"]] == [
        (user, NOW) for user in (1, 2, 3)]  # a rejected command registers no one
    # u7 made user 2's membership of A permanent (an upsert over the TTL u2 gave it); u6 lifted the
    # exclusion u3 made and deleted user 3's membership of A; u8 excluded user 1 from R.
    assert [(row["user_id"], row["segment_id"], row["expires_at"]) for row in one_statement["memberships"]] == [
        (2, 1, None), (3, 2, None)]
    assert [(row["user_id"], row["segment_id"]) for row in one_statement["rollout_exclusions"]] == [(1, 2)]
    assert [(row["user_id"], row["segment_slug"], row["operation"], row["command_id"])
            for row in one_statement["membership_history"]] == [
        (2, "A", "I", "u2"), (3, "A", "I", "u3"), (3, "R", "D", "u3"), (3, "R", "I", "u6"), (3, "A", "D", "u6"),
        (1, "R", "D", "u8")]
    outcomes = {row["command_id"]: row for row in one_statement["command_outcomes"]}
    assert outcomes["u2"]["result"]["expires_at"] == "2026-11-20T13:00:00.000Z"
    assert outcomes["u4"]["status"] == "rejected" and outcomes["u4"]["error"]["code"]
    assert outcomes["u1"]["actor"] == "support"
    [invalid] = [row for row in outcomes.values() if row["status"] == "invalid"]
    assert invalid["error"]["code"] == "invalid_json" and invalid["type"] is None
    assert len(outcomes) == 2 + 6 + 3  # segments, the first user batch, the second less its repeated id


class CountingConnection:
    """A connection that notes the name of each call that sends a statement."""

    STATEMENTS = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_records_to_table"})

    def __init__(self, conn) -> None:
        self._conn = conn
        self.sent: list[str] = []

    def __getattr__(self, name: str):
        attribute = getattr(self._conn, name)
        if name in self.STATEMENTS:
            self.sent.append(name)
        return attribute


async def test_a_small_batch_is_three_statements_between_begin_and_commit(pool, settings, monkeypatch):
    """The inbox look-up, the state the commands decide on, and every write: at light load each
    round trip to the database is latency."""
    monkeypatch.setattr("services.command_consumer.batch._clock", lambda: NOW)
    async with pool.acquire() as conn:
        await apply_batch(conn, parsed(settings, settings.segments_commands_topic, SEGMENT_BATCH))
    batch = parsed(settings, settings.assignments_commands_topic, USER_BATCHES[0])
    async with pool.acquire() as conn:
        counting = CountingConnection(conn)
        processed = await apply_batch(counting, batch, settings.outcome_retention)
    assert counting.sent == ["fetch", "fetch", "execute"]
    assert len(processed) == len(batch)
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(SEGMENT_BATCH) + len(batch)
