"""segmentctl, as installed with the project, driving the running services end to end."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest

from services.query_api.replicas import parse_lsn
from shared.rollout import rollout_bucket
from tests.support import service_env

pytestmark = pytest.mark.e2e
SEGMENTCTL = str(Path(sys.executable).with_name("segmentctl"))


def segmentctl(stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = service_env(stack.settings, SEGMENTCTL_API_URL=stack.api_url())
    return subprocess.run([SEGMENTCTL, "--timeout", "20", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_segmentctl_creates_updates_imports_waits_and_reports_status(stack, tmp_path):
    created = segmentctl(stack, "segment", "create", "AVITO_VOICE_MESSAGES", "--percent", "10", "--wait")
    assert created.returncode == 0, created.stderr
    outcome = orjson.loads(created.stdout)
    assert (outcome["type"], outcome["status"]) == ("create_segment", "applied")
    assert segmentctl(stack, "segment", "create", "AVITO_DISCOUNT_30", "-w").returncode == 0
    assert segmentctl(stack, "segment", "update", "AVITO_DISCOUNT_30", "--description", "30% off",
                      "-w").returncode == 0

    before = datetime.now(UTC)
    updated = segmentctl(stack, "user", "update", "1000", "--add", "AVITO_VOICE_MESSAGES,AVITO_DISCOUNT_30",
                         "--ttl", "2d", "--wait", "--command-id", "u-1000", "--actor", "support:alice")
    assert updated.returncode == 0, updated.stderr
    result = orjson.loads(updated.stdout)["result"]
    assert result["added"] == ["AVITO_VOICE_MESSAGES", "AVITO_DISCOUNT_30"]
    expires_at = datetime.fromisoformat(result["expires_at"])
    assert before + timedelta(days=2) <= expires_at <= datetime.now(UTC) + timedelta(days=2)

    status = segmentctl(stack, "status", "u-1000")
    assert status.returncode == 0
    published, stored = orjson.loads(updated.stdout), orjson.loads(status.stdout)
    published_token, stored_token = published.pop("consistency_token"), stored.pop("consistency_token")
    assert stored == published and parse_lsn(stored_token) >= parse_lsn(published_token)
    segments = segmentctl(stack, "user", "segments", "1000", "--token", published_token)  # the token handed on
    assert segments.returncode == 0, segments.stderr
    assert sorted(s["slug"] for s in orjson.loads(segments.stdout)["segments"]) == [
        "AVITO_DISCOUNT_30", "AVITO_VOICE_MESSAGES"]
    assert segmentctl(stack, "user", "segments", "1000", "--token", "not-a-token").returncode == 2
    missing = segmentctl(stack, "status", "never-published")
    assert missing.returncode == 1 and "not processed" in missing.stderr

    rejected = segmentctl(stack, "user", "update", "1000", "--add", "NO_SUCH_SEGMENT", "--wait")
    assert rejected.returncode == 1
    assert orjson.loads(rejected.stdout)["error"]["code"] == "segment_not_found"
    published = segmentctl(stack, "user", "create", "2000")  # without --wait: where it went
    assert published.returncode == 0
    assert orjson.loads(published.stdout)["topic"] == stack.settings.assignments_commands_topic

    # 10,000 rows: users 1..5000 get both segments (half with a TTL), 10 rows name a missing segment.
    rows = ["user_id,segment_slug,action,ttl"]
    for user_id in range(1, 5001):
        rows.append(f"{user_id},AVITO_VOICE_MESSAGES,,{'1d' if user_id % 2 else ''}")
        rows.append(f"{user_id},{'GONE' if user_id <= 10 else 'AVITO_DISCOUNT_30'},add,")
    csv = tmp_path / "assignments.csv"
    csv.write_text("\n".join(rows) + "\n")
    started = time.monotonic()
    imported = segmentctl(stack, "import", str(csv))
    print(f"import of 10,000 rows: {time.monotonic() - started:.1f}s")
    assert imported.returncode == 1, imported.stderr  # some rows were rejected
    assert imported.stdout.strip() == ("applied 9990, rejected 10, invalid 0, no outcome 0, skipped 0 "
                                       "(of 10000 rows)")
    assert "line 3: rejected segment_not_found" in imported.stderr  # rejections named by line
    assert "processed" in imported.stderr  # the progress bar

    with httpx.Client(base_url=stack.api_url()) as http:
        segments = http.get("/users/4999/segments").json()["segments"]
        assert [(s["slug"], s["expires_at"] is not None) for s in segments] == [
            ("AVITO_DISCOUNT_30", False), ("AVITO_VOICE_MESSAGES", True)]
        assert [s["slug"] for s in http.get("/users/5/segments").json()["segments"]] == ["AVITO_VOICE_MESSAGES"]

    with psycopg.connect(stack.settings.database_url) as db:
        history_rows = db.execute("SELECT count(*) FROM membership_history").fetchone()[0]
        # Users the 10 % rollout covers are in the segment already: an explicit add is no change for
        # them; nor for user 1000, who had both segments before the import.
        covered = sum(rollout_bucket("AVITO_VOICE_MESSAGES", user_id) < 1000 for user_id in range(1, 5001))
        assert history_rows == 2 + 9990 - covered - 2
        again = segmentctl(stack, "import", str(csv))  # same file, same command ids: nothing applied twice
        assert again.stdout == imported.stdout
        assert db.execute("SELECT count(*) FROM membership_history").fetchone()[0] == history_rows
    tail = segmentctl(stack, "tail", "--from-beginning", "--status", "rejected", "--limit", "11", "--json")
    assert tail.returncode == 0
    assert len([orjson.loads(line) for line in tail.stdout.splitlines()]) == 11  # 10 import rows + one update


def test_segmentctl_watch_follows_changes_live_and_from_a_time(stack):
    started = datetime.now(UTC)
    env = service_env(stack.settings, SEGMENTCTL_API_URL=stack.api_url())
    live = subprocess.Popen([SEGMENTCTL, "--timeout", "20", "watch", "--user", "1000", "--json", "--limit", "3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # watching from the end of the topic before anything changes
        assert segmentctl(stack, "segment", "create", "WATCHED", "--percent", "100", "-w").returncode == 0
        assert segmentctl(stack, "segment", "create", "OTHER", "-w").returncode == 0
        assert segmentctl(stack, "user", "update", "1000", "--add", "OTHER", "--ttl", "1h", "-w").returncode == 0
        assert segmentctl(stack, "user", "update", "2000", "--add", "OTHER", "-w").returncode == 0
        assert segmentctl(stack, "user", "update", "1000", "--remove", "WATCHED,OTHER", "-w").returncode == 0
        output, errors = live.communicate(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.communicate()
    assert live.returncode == 0, errors
    events = [orjson.loads(line) for line in output.splitlines()]
    # WATCHED's rollout covers every bucket, so user 1000 entered by it; then its own entries and exits.
    assert [(e["kind"], e.get("operation"), e["segment"]) for e in events] == [
        ("rollout", None, "WATCHED"), ("membership", "I", "OTHER"), ("membership", "D", "WATCHED")]
    assert events[0]["buckets_entered"] == [0, 10000] and events[1]["expires_at"] is not None

    replayed = segmentctl(stack, "watch", "--from", started.isoformat(), "--segment", "OTHER", "--limit", "3")
    assert replayed.returncode == 0, replayed.stderr
    lines = replayed.stdout.splitlines()
    assert len(lines) == 3 and sum("user 2000 entered OTHER, manual" in line for line in lines) == 1
    of_1000 = [line for line in lines if "user 1000" in line]  # one user's changes in the order they committed
    assert "user 1000 entered OTHER until" in of_1000[0] and "user 1000 left OTHER, manual" in of_1000[1]
