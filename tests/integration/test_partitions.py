"""Data that stays bounded: history by month and the outcome inbox by record time, partitions made
ahead by the expiry worker's maintenance, dropped whole past retention; a write with no partition
ready still lands; a record older than the inbox window is rejected too_old; reports read only
their month's partition, and a month dropped by retention answers 410."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import structlog

from services.command_consumer import metrics as consumer_metrics
from services.command_consumer.batch import apply_batch
from services.command_consumer.parsing import RecordRef, parse_record
from services.expiry_worker import partitions as partition_metrics
from services.expiry_worker.partitions import (
    HISTORY,
    OUTCOMES,
    PartitionMaintainer,
    add_months,
    create_partition,
    history_partition_name,
    month_start,
    partitions,
)
from services.query_api.reports import EXPLICIT_COPY_SQL, EXPLICIT_SQL, month_bounds
from tests.support import Publisher, read_topic, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration


async def where(pool, table: str, condition: str, *args) -> list[str]:
    """The partitions holding the rows of `table` that match `condition`."""
    rows = await pool.fetch(f"SELECT DISTINCT tableoid::regclass::text AS part FROM {table} WHERE {condition}", *args)
    return sorted(row["part"] for row in rows)


def scanned(plan: list) -> set[str]:
    """Tables an EXPLAIN (ANALYZE, FORMAT JSON) plan actually read (runtime-pruned ones are absent)."""
    found: set[str] = set()

    def walk(node: dict) -> None:
        if "Relation Name" in node and node.get("Actual Loops", 1) > 0:
            found.add(node["Relation Name"])
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    return found


async def test_a_months_report_reads_only_that_months_partition(pool):
    months = [datetime(2024, month, 1, tzinfo=UTC) for month in (3, 4, 5)]
    async with pool.acquire() as conn:
        for lower in months:
            await create_partition(conn, HISTORY, history_partition_name(lower), lower, add_months(lower, 1))
    await pool.execute(
        """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
           SELECT g % 100 + 1, 'S', 'I', m + (g % 20) * interval '1 day', 'manual', 'manual'
           FROM generate_series(1, 3000) AS g, unnest($1::timestamptz[]) AS m""", months)
    await pool.execute("ANALYZE membership_history")
    start, end = month_bounds(2024, 4)
    for sql, user_id in ((EXPLICIT_SQL, None), (EXPLICIT_SQL, 7), (EXPLICIT_COPY_SQL, None), (EXPLICIT_COPY_SQL, 7)):
        async with pool.acquire() as conn:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", start, end, user_id)
        plan = json.loads(plan) if isinstance(plan, str) else plan
        assert scanned(plan) == {"membership_history_p202404"}, (sql, user_id, scanned(plan))


async def test_a_write_past_the_prepared_months_lands_and_moves_into_its_partition(pool, settings, monkeypatch,
                                                                                  api):
    prepared = await partitions(pool, HISTORY)
    beyond = max(p.upper for p in prepared) + timedelta(days=40)  # a month with no partition
    monkeypatch.setattr("services.command_consumer.batch._clock", lambda: beyond)
    commands = [{"type": "create_segment", "slug": "LATER", "command_id": "s"},
                {"type": "update_user_segments", "user_id": 5, "add": ["LATER"], "command_id": "u"}]
    async with pool.acquire() as conn:
        for offset, command in enumerate(commands):
            topic = settings.segments_commands_topic if offset == 0 else settings.assignments_commands_topic
            record = RecordRef(topic, 0, offset, b"k", orjson.dumps(command), (), int(beyond.timestamp() * 1000))
            parsed = parse_record(record, settings.segments_commands_topic, settings.max_command_bytes)
            [processed] = await apply_batch(conn, [parsed], settings.outcome_retention)
            assert processed.outcome.status == "applied"
    assert await where(pool, "membership_history", "user_id = 5") == ["membership_history_default"]

    run = await PartitionMaintainer(pool, settings, clock=lambda: beyond).run_once()
    month = history_partition_name(month_start(beyond))
    assert month in run.created[HISTORY.name]
    assert run.rows_moved >= 1
    assert await where(pool, "membership_history", "user_id = 5") == [month]
    assert await pool.fetchval("SELECT count(*) FROM membership_history_default") == 0
    link = (await api.get("/reports/history", params={"year": beyond.year, "month": beyond.month,
                                                      "user_id": 5})).json()["report_link"]
    lines = (await api.get(link)).text.splitlines()
    assert lines[1].startswith("5,LATER,I,")


async def test_history_retention_drops_whole_months_and_their_reports_answer_410(pool, settings, api):
    now = datetime.now(UTC)
    old, kept = add_months(month_start(now), -14), add_months(month_start(now), -2)
    async with pool.acquire() as conn:
        for lower in (old, add_months(old, 1)):
            await create_partition(conn, HISTORY, history_partition_name(lower), lower, add_months(lower, 1))
    await pool.execute(
        """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
           SELECT g, 'S', 'I', m + interval '1 hour', 'manual', 'manual'
           FROM generate_series(1, 1000) AS g, unnest($1::timestamptz[]) AS m""", [old, add_months(old, 1), kept])
    segment = await pool.fetchval("INSERT INTO segments (slug, percent, created_at, updated_at) "
                                  "VALUES ('R', 10, $1, $1) RETURNING id", old)
    event = await pool.fetchval("INSERT INTO rollout_events (segment_id, segment_slug, old_percent, new_percent, "
                                "reason, executed_at, command_id) VALUES ($1, 'R', 0, 10, 'created', $2, 'c') "
                                "RETURNING id", segment, old + timedelta(hours=2))
    await pool.execute("INSERT INTO rollout_event_overrides VALUES ($1, 1)", event)

    settings = settings.model_copy(update={"history_retention_months": 12})
    dropped_before = partition_metrics.ROWS_DROPPED.labels(HISTORY.name)._value.get()
    run = await PartitionMaintainer(pool, settings).run_once()
    # What operators see: rows dropped, partitions left, and the oldest range kept.
    assert partition_metrics.ROWS_DROPPED.labels(HISTORY.name)._value.get() == dropped_before + 2000
    left = await partitions(pool, HISTORY)
    assert partition_metrics.PARTITIONS.labels(HISTORY.name)._value.get() == len(left)
    assert partition_metrics.OLDEST.labels(HISTORY.name)._value.get() == left[0].lower.timestamp()
    assert sorted(run.dropped[HISTORY.name]) == [history_partition_name(old),
                                                 history_partition_name(add_months(old, 1))]
    assert run.rows_dropped[HISTORY.name] == 2000
    assert await pool.fetchval("SELECT count(*) FROM membership_history") == 1000  # the kept month's
    assert await pool.fetchval("SELECT count(*) FROM rollout_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM rollout_event_overrides") == 0

    gone = await api.get("/reports/history", params={"year": old.year, "month": old.month})
    assert gone.status_code == 410
    assert "past retention" in gone.json()["detail"] and "HISTORY_RETENTION_MONTHS" in gone.json()["detail"]
    link = (await api.get("/reports/history", params={"year": kept.year, "month": kept.month})).json()["report_link"]
    assert len((await api.get(link)).text.splitlines()) == 1001
    # A link made before the drop answers 410 too, not an empty CSV.
    stale_link = link.replace(link.split("token=")[1],
                              api.app.state.resources.signer.sign(old.year, old.month, None))
    assert (await api.get(stale_link)).status_code == 410


async def test_outcomes_live_in_record_time_partitions_dropped_whole_past_the_window(pool, settings, api):
    settings = settings.model_copy(update={"outcome_retention": 60, "outcome_partition_interval": 10,
                                           "partition_maintenance_interval": 5})
    now = datetime.now(UTC)
    maintainer = PartitionMaintainer(pool, settings, clock=lambda: now)
    await maintainer.run_once()
    made = await partitions(pool, OUTCOMES)
    assert made and max(p.upper for p in made) >= now + timedelta(seconds=30)  # three intervals ahead

    stamp = int(now.timestamp() * 1000)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        # The same command id in two records 25 s apart: different partitions, one effect.
        for offset_ms in (-25_000, 0):
            await publish.producer.send_and_wait(
                settings.assignments_commands_topic, orjson.dumps({"type": "create_user", "user_id": 9,
                                                                   "command_id": "twice"}),
                key=b"9", timestamp_ms=stamp + offset_ms)
        await publish.user({"type": "create_user", "user_id": 10, "command_id": "fresh"})
        await wait_for_outcomes(pool, ["twice", "fresh"])
        results = await read_topic(settings, settings.results_topic, 3)
    outcomes = [orjson.loads(record.value) for record in results]
    assert [o["status"] for o in outcomes if o["command_id"] == "twice"] == ["applied", "applied"]
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = 'twice'") == 1
    assert await pool.fetchval("SELECT count(*) FROM users WHERE user_id = 9") == 1
    first = next(p.name for p in made if p.lower <= now - timedelta(seconds=25) < p.upper)
    assert await where(pool, "command_outcomes", "command_id = 'twice'") == [first]
    assert "command_outcomes_default" not in await where(pool, "command_outcomes", "true")

    later = now + timedelta(seconds=60 + 10 + 31)  # past the window and its one-interval margin
    run = await PartitionMaintainer(pool, settings, clock=lambda: later).run_once()
    assert run.rows_dropped[OUTCOMES.name] == 2
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == 0
    assert await pool.fetchval("SELECT count(*) FROM users WHERE user_id IN (9, 10)") == 2  # effects stay
    response = await api.get("/commands/twice")
    assert response.status_code == 404
    assert "expired" in response.json()["detail"] and "OUTCOME_RETENTION" in response.json()["detail"]


async def test_a_record_older_than_the_window_is_rejected_too_old_and_not_applied(pool, settings):
    settings = settings.model_copy(update={"outcome_retention": 60, "outcome_partition_interval": 10,
                                           "partition_maintenance_interval": 5})
    before = consumer_metrics.TOO_OLD._value.get()
    old = int((time.time() - 120) * 1000)
    with structlog.testing.capture_logs() as logs:
        async with Publisher(settings) as publish, running_consumer(settings, pool):
            await publish.producer.send_and_wait(
                settings.assignments_commands_topic,
                orjson.dumps({"type": "create_user", "user_id": 11, "command_id": "stale"}), key=b"11",
                timestamp_ms=old)
            await publish.user({"type": "create_user", "user_id": 11, "command_id": "after"})
            await wait_for_outcomes(pool, ["after"])
            results = await read_topic(settings, settings.results_topic, 2)
    stale = next(orjson.loads(r.value) for r in results if r.key == b"stale")
    assert stale["status"] == "rejected" and stale["error"]["code"] == "too_old"
    assert "OUTCOME_RETENTION" in stale["error"]["message"]
    # Not applied: the later command created the user, and nothing of `stale` is stored.
    after = next(orjson.loads(r.value) for r in results if r.key == b"after")
    assert after["status"] == "applied" and after["result"]["created"] is True
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = 'stale'") == 0
    assert consumer_metrics.TOO_OLD._value.get() == before + 1
    [line] = [entry for entry in logs if entry.get("command_id") == "stale"]
    assert line["log_level"] == "warning" and line["code"] == "too_old" and "older than the outcome window" in line[
        "event"]
