"""Slugs and free text full of SQL and shell metacharacters: refused by validation (HTTP 422, or
the DLQ when they come straight from Kafka) or stored and returned literally, never interpreted."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

from tests.support import Publisher, header, read_topic, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration

REFUSED_SLUGS = [
    "A'; DROP TABLE segments;--", "A\"; DELETE FROM memberships; --", "$(rm -rf /)", "`id`", "A;B", "A|B",
    "A&&B", "A B", "A/B", "..\\x", "A\x00B", "A\nB", "АVITO",  # the last starts with a Cyrillic А
    "%27%20OR%201%3D1", "*", "A,B", "",
]
ODD_BUT_VALID_SLUGS = ["A.B-C_D", "1", "0x00", "A--", "Z.."]
# Valid before v2 of the contract, refused for new segments since (they begin with - _ .);
# segments created with them before keep working.
OLD_STYLE_SLUGS = ["--", "..", ".", "-rf", "--help", "_", "-A1"]
HOSTILE_TEXT = "'; DROP TABLE segments; -- $(rm -rf /) `id` && echo pwned | tee /tmp/x <script>alert(1)</script> \\x00"


async def test_metacharacter_slugs_are_refused_at_the_gateway(api):
    for slug in REFUSED_SLUGS:
        for command in ({"type": "create_segment", "slug": slug},
                        {"type": "update_user_segments", "user_id": 1, "add": [slug]}):
            response = await api.post("/commands", json=command)
            assert response.status_code == 422, (slug, response.text)
            assert "slug" in response.text or "add" in response.text


async def test_metacharacter_slugs_from_kafka_are_dead_lettered_and_change_nothing(settings, pool):
    tables = ("segments", "users", "memberships", "membership_history", "rollout_exclusions")
    before = {table: await pool.fetchval(f"SELECT count(*) FROM {table}") for table in tables}
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        for i, slug in enumerate(REFUSED_SLUGS):
            await publish.segment({"type": "create_segment", "slug": slug, "command_id": f"s{i}"})
            await publish.user({"type": "update_user_segments", "user_id": 1, "add": [slug], "command_id": f"u{i}"})
        ids = [f"{kind}{i}" for i in range(len(REFUSED_SLUGS)) for kind in "su"]
        outcomes = await wait_for_outcomes(pool, ids)
    assert {outcome["status"] for outcome in outcomes.values()} == {"invalid"}
    dead = await read_topic(settings, settings.dlq_topic, len(ids))
    assert len(dead) == len(ids) and {header(record, "x-error-code") for record in dead} == {"invalid_field"}
    assert {table: await pool.fetchval(f"SELECT count(*) FROM {table}") for table in tables} == before
    assert await pool.fetchval("SELECT count(*) FROM command_outcomes") == len(ids)  # the tables still work


async def test_a_new_slug_must_begin_with_a_letter_or_a_digit(settings, pool, api):
    for slug in OLD_STYLE_SLUGS:
        response = await api.post("/commands", json={"type": "create_segment", "slug": slug})
        assert response.status_code == 422 and "must begin with a letter or a digit" in response.text, slug
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        for i, slug in enumerate(OLD_STYLE_SLUGS):
            await publish.segment({"type": "create_segment", "slug": slug, "command_id": f"s{i}"})
        outcomes = await wait_for_outcomes(pool, [f"s{i}" for i in range(len(OLD_STYLE_SLUGS))])
    for outcome in outcomes.values():
        assert outcome["status"] == "invalid" and outcome["error"]["code"] == "invalid_field"
        assert "must begin with a letter or a digit" in outcome["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM segments") == 0


async def test_segments_from_before_the_first_character_rule_keep_working(settings, pool, api):
    """Inserted as the earlier version stored them: every command but create_segment still takes
    them, reads return them, and a report holds them literally (the contract's CSV format)."""
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) "
                       "SELECT unnest($1::text[]), now(), now()", OLD_STYLE_SLUGS)
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.user({"type": "update_user_segments", "user_id": 42, "add": OLD_STYLE_SLUGS,
                            "command_id": "u"})
        await wait_for_outcomes(pool, ["u"])  # no order across topics: the delete must come after
        await publish.segment({"type": "update_segment", "slug": "-A1", "percent": 100, "command_id": "p"})
        await publish.segment({"type": "delete_segment", "slug": "--help", "command_id": "d"})
        outcomes = await wait_for_outcomes(pool, ["u", "p", "d"])
    assert {outcome["status"] for outcome in outcomes.values()} == {"applied"}
    assert outcomes["u"]["result"]["added"] == OLD_STYLE_SLUGS
    alive = sorted(set(OLD_STYLE_SLUGS) - {"--help"})
    assert [s["slug"] for s in (await api.get("/segments")).json()["segments"]] == alive
    for slug in alive:
        # Clients resolve "." and ".." path segments before sending; percent-encoded they arrive as slugs.
        response = await api.get(f"/segments/{quote(slug, safe='').replace('.', '%2E')}")
        assert response.status_code == 200 and response.json()["slug"] == slug, slug
    assert [s["slug"] for s in (await api.get("/users/42/segments")).json()["segments"]] == alive

    now = datetime.now(UTC)
    link = (await api.get("/users/42/history", params={"year": now.year, "month": now.month})).json()["report_link"]
    rows = list(csv.DictReader(io.StringIO((await api.get(link)).text)))
    assert sorted((row["segment_slug"], row["operation"]) for row in rows) == sorted(
        [(slug, "I") for slug in OLD_STYLE_SLUGS] + [("--help", "D")])


async def test_odd_slugs_and_hostile_text_are_stored_and_returned_literally(settings, pool, api):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        for i, slug in enumerate(ODD_BUT_VALID_SLUGS):
            await publish.segment({"type": "create_segment", "slug": slug, "description": HOSTILE_TEXT,
                                   "actor": HOSTILE_TEXT[:128], "command_id": f"s{i}"})
        await wait_for_outcomes(pool, [f"s{i}" for i in range(len(ODD_BUT_VALID_SLUGS))])
        await publish.user({"type": "update_user_segments", "user_id": 42, "add": ODD_BUT_VALID_SLUGS,
                            "command_id": "u"})
        outcome = (await wait_for_outcomes(pool, ["u"]))["u"]
    assert outcome["status"] == "applied" and outcome["result"]["added"] == ODD_BUT_VALID_SLUGS

    listed = (await api.get("/segments")).json()["segments"]
    assert {s["slug"]: s["description"] for s in listed} == {slug: HOSTILE_TEXT for slug in ODD_BUT_VALID_SLUGS}
    for slug in ODD_BUT_VALID_SLUGS:
        response = await api.get(f"/segments/{quote(slug, safe='')}")
        assert response.status_code == 200 and response.json()["slug"] == slug, slug
    for slug in REFUSED_SLUGS[:6]:
        response = await api.get(f"/segments/{quote(slug, safe='')}")
        assert response.status_code in (404, 422), slug  # refused ("/" makes it another path), never run
    segments = (await api.get("/users/42/segments")).json()["segments"]
    assert [s["slug"] for s in segments] == sorted(ODD_BUT_VALID_SLUGS)

    now = datetime.now(UTC)
    link = (await api.get("/users/42/history", params={"year": now.year, "month": now.month})).json()["report_link"]
    report = await api.get(link)
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert sorted(row["segment_slug"] for row in rows) == sorted(ODD_BUT_VALID_SLUGS)
