"""Percent rollout through the real pipeline: coverage at read time, exclusions, exact history."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

from shared.rollout import rollout_bucket
from tests.buckets import user_in_buckets
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
SLUG = "AVITO_VOICE_MESSAGES"


async def segments_of(api, user_id: int) -> list[tuple[str, str]]:
    await api.app.state.resources.rollout.refresh()
    body = (await api.get(f"/users/{user_id}/segments")).json()
    return [(s["slug"], s["source"]) for s in body["segments"]]


async def report(api, user_id: int | None = None) -> list[str]:
    now = datetime.now(UTC)
    params = {"year": now.year, "month": now.month}
    if user_id is not None:
        params["user_id"] = user_id
    link = (await api.get("/reports/history", params=params)).json()["report_link"]
    parts = urlsplit(link)
    lines = (await api.get(f"{parts.path}?{parts.query}")).text.splitlines()
    assert lines[0] == "user_id,segment_slug,operation,executed_at,source,reason"
    return [",".join(line.split(",")[:3] + line.split(",")[4:]) for line in lines[1:]]  # without the time


async def apply(publish, pool, *commands) -> dict:
    ids = []
    for command in commands:
        ids.append(command["command_id"])
        if "slug" in command:
            await publish.segment(command)
        else:
            await publish.user(command)
        await wait_for_outcomes(pool, [ids[-1]])  # one after the other: no order across topics
    outcomes = await wait_for_outcomes(pool, ids)
    assert all(o["status"] == "applied" for o in outcomes.values()), outcomes
    return outcomes


async def test_percent_raised_then_lowered_with_the_history_of_a_user_never_seen(settings, pool, api):
    mover = user_in_buckets(SLUG, 1000, 3000)      # covered at percent 30, not at 10 or 5
    stayer = user_in_buckets(SLUG, 0, 500)         # in all along
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool,
                    {"type": "create_segment", "slug": SLUG, "percent": 10, "command_id": "create"})
        assert await segments_of(api, mover) == []
        assert await segments_of(api, stayer) == [(SLUG, "auto")]
        await apply(publish, pool, {"type": "update_segment", "slug": SLUG, "percent": 30, "command_id": "up"})
        assert await segments_of(api, mover) == [(SLUG, "auto")]
        await apply(publish, pool, {"type": "update_segment", "slug": SLUG, "percent": 5, "command_id": "down"})
        assert await segments_of(api, mover) == []
    assert await pool.fetchval("SELECT count(*) FROM memberships") == 0  # no per-user rows
    assert await pool.fetchval("SELECT count(*) FROM users") == 0  # neither user was ever seen
    assert await report(api, mover) == [f"{mover},{SLUG},I,auto,percent_changed",
                                        f"{mover},{SLUG},D,auto,percent_changed"]
    assert await report(api, stayer) == [f"{stayer},{SLUG},I,auto,created"]


async def test_exclusion_holds_through_percent_changes_until_an_explicit_add(settings, pool, api):
    user_id = user_in_buckets(SLUG, 0, 1000)  # covered from percent 10
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool,
                    {"type": "create_segment", "slug": SLUG, "percent": 10, "command_id": "create"},
                    {"type": "update_user_segments", "user_id": user_id, "remove": [SLUG], "command_id": "rm"})
        assert await segments_of(api, user_id) == []
        await apply(publish, pool,
                    {"type": "update_segment", "slug": SLUG, "percent": 0, "command_id": "zero"},
                    {"type": "update_segment", "slug": SLUG, "percent": 50, "command_id": "half"})
        assert await segments_of(api, user_id) == []  # excluded whatever the percent does
        await apply(publish, pool, {"type": "update_user_segments", "user_id": user_id, "add": [SLUG],
                                    "command_id": "add"})
        assert await segments_of(api, user_id) == [(SLUG, "manual")]
        await apply(publish, pool, {"type": "update_user_segments", "user_id": user_id, "remove": [SLUG],
                                    "command_id": "rm2"},
                    {"type": "update_user_segments", "user_id": user_id, "add": [SLUG], "ttl_seconds": 3600,
                     "command_id": "add-ttl"})
    assert await report(api, user_id) == [
        f"{user_id},{SLUG},I,auto,created",
        f"{user_id},{SLUG},D,manual,manual",
        f"{user_id},{SLUG},I,manual,manual",
        f"{user_id},{SLUG},D,manual,manual",
        f"{user_id},{SLUG},I,manual,manual",
    ]


async def test_segment_deleted_while_covering_users(settings, pool, api):
    covered = user_in_buckets(SLUG, 0, 5000)
    explicit_and_covered = user_in_buckets(SLUG, 0, 5000, skip=1)
    outside = user_in_buckets(SLUG, 5000, 10000)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await apply(publish, pool,
                    {"type": "create_segment", "slug": SLUG, "percent": 50, "command_id": "create"},
                    {"type": "update_user_segments", "user_id": explicit_and_covered, "add": [SLUG],
                     "command_id": "add"},
                    {"type": "update_user_segments", "user_id": outside, "add": [SLUG], "command_id": "add2"},
                    {"type": "delete_segment", "slug": SLUG, "command_id": "delete"})
        for user_id in (covered, explicit_and_covered, outside):
            assert await segments_of(api, user_id) == []
    assert await report(api, covered) == [f"{covered},{SLUG},I,auto,created",
                                          f"{covered},{SLUG},D,auto,segment_deleted"]
    # In through the rollout, then explicitly: it left once, by the deletion of its explicit membership.
    assert await report(api, explicit_and_covered) == [f"{explicit_and_covered},{SLUG},I,auto,created",
                                                       f"{explicit_and_covered},{SLUG},D,manual,segment_deleted"]
    assert await report(api, outside) == [f"{outside},{SLUG},I,manual,manual",
                                          f"{outside},{SLUG},D,manual,segment_deleted"]


async def test_all_users_report_has_rollout_rows_for_every_registered_user(settings, pool, api):
    registered = list(range(1, 301))
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.users([{"type": "create_user", "user_id": u, "command_id": f"u{u}"} for u in registered])
        await wait_for_outcomes(pool, [f"u{u}" for u in registered])
        await apply(publish, pool,
                    {"type": "create_segment", "slug": SLUG, "percent": 20, "command_id": "create"},
                    {"type": "update_user_segments", "user_id": 7, "add": [SLUG], "command_id": "add7"},
                    {"type": "update_segment", "slug": SLUG, "percent": 40, "command_id": "up"})
    rows = await report(api)
    expected_created = [f"{u},{SLUG},I,auto,created" for u in registered if rollout_bucket(SLUG, u) < 2000]
    expected_raised = [f"{u},{SLUG},I,auto,percent_changed" for u in registered
                       if 2000 <= rollout_bucket(SLUG, u) < 4000 and u != 7]
    manual = [f"7,{SLUG},I,manual,manual"] if rollout_bucket(SLUG, 7) >= 2000 else []
    assert rows == expected_created + manual + expected_raised
    assert 30 < len(expected_created) < 90 and expected_raised
    assert all(int(row.split(",")[0]) in registered for row in rows)


async def september_with_a_rollout_change(pool) -> None:
    """September 2023: SLUG created at 50 % on the 10th, and user 5's explicit entry into OTHER on the 11th."""
    segment_id = await pool.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                     "VALUES ($1, 50, '2023-09-10', '2023-09-10') RETURNING id", SLUG)
    await pool.execute("INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason, "
                       "executed_at, command_id) VALUES ($1, $2, 0, 50, 'created', '2023-09-10', 'c')",
                       segment_id, SLUG)
    await pool.execute("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                       "reason) VALUES (5, 'OTHER', 'I', '2023-09-11', 'manual', 'manual')")


async def keep() -> None:
    """A report's `release` when the test holds the connection itself."""


async def test_all_users_report_with_rollout_rows_streams_with_flat_memory(pool):
    import tracemalloc

    from services.query_api.reports import stream_report

    users = 100_000
    await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g", users)
    await september_with_a_rollout_change(pool)
    tracemalloc.start()
    lines, chunks, last = 0, 0, None
    try:
        conn = await pool.acquire()
        async for chunk in stream_report(conn, 2023, 9, None, release=lambda: pool.release(conn)):
            chunks += 1
            rows = chunk.decode().splitlines()
            lines += len(rows)
            last = rows[-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    covered = sum(1 for u in range(1, users + 1) if rollout_bucket(SLUG, u) < 5000)
    assert lines == 1 + covered + 1  # header, the rollout's entries, the explicit row after them
    assert last == "5,OTHER,I,2023-09-11 00:00:00,manual,manual"
    assert chunks > 5
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes: the report was held in memory"


async def test_a_report_runs_with_the_work_mem_it_is_given_and_leaves_the_connection_as_it_was(pool):
    """REPORT_WORK_MEM holds for the report's transaction only: the pooled connection goes back
    with the server's own."""
    from services.query_api.reports import stream_report

    await september_with_a_rollout_change(pool)
    async with pool.acquire() as conn:
        own = await conn.fetchval("SHOW work_mem")
        assert own != "7MB"
        chunks = stream_report(conn, 2023, 9, 5, release=keep, work_mem="7MB")
        assert await anext(chunks) == b"user_id,segment_slug,operation,executed_at,source,reason\n"
        assert b"5,OTHER,I,2023-09-11" in await anext(chunks)
        # The rows are all out; the stream waits inside the report's transaction.
        assert await conn.fetchval("SHOW work_mem") == "7MB"
        await chunks.aclose()
        assert await conn.fetchval("SHOW work_mem") == own


async def test_a_report_closed_midway_leaves_no_copy_running_and_its_connection_usable(pool):
    """The client goes away while a rollout change's users still stream from COPY: every stream
    inside the report closes in order, so the report's transaction ends on a quiet connection."""
    from services.query_api.reports import stream_report

    await pool.execute("INSERT INTO users SELECT g, '2023-08-01' FROM generate_series(1, 1000000) AS g")
    await september_with_a_rollout_change(pool)
    async with pool.acquire() as conn:
        chunks = stream_report(conn, 2023, 9, None, release=keep)
        await anext(chunks)  # the header
        assert f",{SLUG},I,".encode() in await anext(chunks)  # the first of far more ids than the COPY's queue holds
        await chunks.aclose()
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
    running = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' "
                                  "AND pid <> pg_backend_pid() AND datname = current_database()")
    assert running == 0


async def test_all_users_report_orders_the_rows_of_one_moment_by_user_then_segment(pool):
    """Two events and an explicit row at the same moment, explicit rows before and after it: the
    report is the contract's order over all of them (time, user, segment)."""
    from services.query_api.reports import stream_report

    users = 300
    await pool.execute("INSERT INTO users SELECT g, '2023-09-01' FROM generate_series(1, $1) AS g", users)
    moment = datetime(2023, 9, 10, 12, tzinfo=UTC)
    for name in ("B_HALF", "A_HALF"):
        segment_id = await pool.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                         "VALUES ($1, 50, '2023-09-01', $2) RETURNING id", name, moment)
        await pool.execute("INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, reason, "
                           "executed_at, command_id, overrides_kept) "
                           "VALUES ($1, $2, 0, 50, 'percent_changed', $3, $2, false)", segment_id, name, moment)
    explicit = [(7, "A_HALF", moment), (3, "OTHER", moment.replace(hour=11)), (2, "OTHER", moment.replace(hour=13))]
    await pool.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                           "reason) VALUES ($1, $2, 'I', $3, 'manual', 'manual')", explicit)
    conn = await pool.acquire()
    body = b"".join([chunk async for chunk in stream_report(conn, 2023, 9, None, release=lambda: pool.release(conn))])
    rows = [line.split(",") for line in body.decode().splitlines()[1:]]
    expected = [(moment.replace(hour=11), 3, "OTHER", "manual")]
    expected += sorted([(moment, u, name, "auto") for u in range(1, users + 1) for name in ("A_HALF", "B_HALF")
                        if rollout_bucket(name, u) < 5000] + [(moment, 7, "A_HALF", "manual")])
    expected += [(moment.replace(hour=13), 2, "OTHER", "manual")]
    assert [(row[3], int(row[0]), row[1], row[4]) for row in rows] == [
        (at.strftime("%Y-%m-%d %H:%M:%S"), u, name, source) for at, u, name, source in expected]
    assert len(expected) > 250
