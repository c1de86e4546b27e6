"""Delivery guarantees under replay and poison (README: "The contract, in short", Delivery and
Invalid records)."""

from __future__ import annotations

import random

import pytest

from tests.contract_model import SEGMENTS, scenario
from tests.support import (
    Publisher,
    create_segments,
    header,
    read_topic,
    running_consumer,
    wait_for_count,
    wait_for_outcomes,
)

pytestmark = pytest.mark.integration

SNAPSHOT_QUERIES = {
    "memberships": "SELECT user_id, segment_id, expires_at FROM memberships ORDER BY 1, 2",
    "exclusions": "SELECT user_id, segment_id FROM rollout_exclusions ORDER BY 1, 2",
    "history": "SELECT id, user_id, segment_slug, operation, executed_at, source, reason FROM membership_history "
               "ORDER BY id",
    "outcomes": "SELECT command_id, status, error, result, processed_at FROM command_outcomes ORDER BY 1",
    "users": "SELECT user_id, registered_at FROM users ORDER BY 1",
    "segments": "SELECT id, slug, percent, deleted_at FROM segments ORDER BY 1",
}


async def snapshot(pool) -> dict[str, list]:
    return {name: [tuple(row) for row in await pool.fetch(query)] for name, query in SNAPSHOT_QUERIES.items()}


async def test_replaying_everything_changes_nothing(settings, pool):
    _, segments, commands = scenario(1500, users=100, seed=5)
    for i, command in enumerate(commands[:300]):  # some without an id: their id is their position
        if i % 3 == 0:
            del command["command_id"]
    async with Publisher(settings) as publish:
        async with running_consumer(settings, pool):
            await create_segments(publish, pool, segments)
            await publish.users(commands)
            await publish.segment({"type": "delete_segment", "slug": SEGMENTS[0], "command_id": "del"})
            await wait_for_outcomes(pool, [c["command_id"] for c in commands if "command_id" in c] + ["del"])
            await wait_for_count(pool, "SELECT count(*) FROM command_outcomes", len(commands) + len(SEGMENTS) + 1)
        before = await snapshot(pool)
        # Everything from the first offset again: a group with no committed offsets starts at the
        # beginning, as the group does after `kafka-consumer-groups --reset-offsets --to-earliest`.
        replay = settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"})
        async with running_consumer(replay, pool):
            await publish.user({"type": "create_user", "user_id": 1, "command_id": "after-replay"})
            await wait_for_outcomes(pool, ["after-replay"])
    after = await snapshot(pool)
    after["outcomes"] = [row for row in after["outcomes"] if row[0] != "after-replay"]
    assert after == before
    results = await read_topic(settings, settings.results_topic, 2 * (len(commands) + len(SEGMENTS) + 1) + 1)
    assert len(results) == 2 * (len(commands) + len(SEGMENTS) + 1) + 1  # every outcome published again, equal


def garbage(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["not_json", "wrong_types", "unknown_type", "huge", "bad_utf8"])
    return {
        "not_json": (b"{not json", "invalid_json"),
        "wrong_types": (b'{"type": "update_user_segments", "user_id": "seven", "add": "A"}', "invalid_field"),
        "unknown_type": (b'{"type": "format_disk"}', "unknown_type"),
        "huge": (b'{"type": "create_user", "user_id": 1, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', "too_large"),
        "bad_utf8": (b'{"type": "create_user", "user_id": 1, "actor": "\xc3\x28"}', "invalid_json"),
    }[kind]


async def test_ten_percent_poison_is_quarantined_and_every_valid_command_applied(settings, pool):
    rng = random.Random(9)
    _, segments, valid = scenario(900, users=50, seed=9)
    stream: list[tuple[str, bytes | dict, str | None]] = []
    for command in valid:
        stream.append((str(command["user_id"]), command, None))
        if rng.random() < 0.1:
            value, code = garbage(rng)
            stream.append((str(rng.randint(1, 50)), value, code))
    expected_codes = [code for _, _, code in stream if code]
    assert len(expected_codes) >= 60
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await create_segments(publish, pool, segments)
        for key, value, _ in stream:
            await publish.raw(settings.assignments_commands_topic, value, key=key)
        outcomes = await wait_for_outcomes(pool, [c["command_id"] for c in valid], timeout=60)
        dlq = await read_topic(settings, settings.dlq_topic, len(expected_codes), timeout=30)
    assert all(o["status"] in ("applied", "rejected") for o in outcomes.values())
    assert sorted(header(r, "x-error-code") for r in dlq) == sorted(expected_codes)
    assert all(header(r, "x-error-message") for r in dlq)
    invalid = await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE status = 'invalid'")
    assert invalid == len(expected_codes)
    print(f"{len(valid)} valid commands applied, {len(expected_codes)} poison records quarantined")
