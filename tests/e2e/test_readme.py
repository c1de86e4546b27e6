"""The README's walk-through, run as a new user would: every block between walkthrough markers, in
the README and then in the docs a reader is told to run, in order, against a fresh `make run` on
the documented ports, exactly as written."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.e2e.launcher import wait_ready

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# What each block must print, in order (a block that prints something else has gone stale).
README = [
    ['"command_id":"try-1"', '"command_id":"try-3"', '"status":"applied"',
     '"segments":[{"slug":"AVITO_VOICE_MESSAGES","source":"manual","expires_at":"'],
    ['{"user_id":1001,"segments":[{"slug":"AVITO_DISCOUNT_30","source":"auto","expires_at":null}]}'],
    ["user_id,segment_slug,operation,executed_at,source,reason\n", "\n1000,AVITO_VOICE_MESSAGES,I,"],
    ['"slug": "AVITO_ONBOARDING"', '"added": [\n      "AVITO_ONBOARDING"', '"command_id": "try-3"'],
    ["user 1000 entered AVITO_VOICE_MESSAGES until ", ", manual (command try-3)\n", "AVITO_ONBOARDING"],
    ["applied ['AVITO_VOICE_MESSAGES']"],
]
OPERATIONS = [
    ['"command_id": "docs-1"', '"percent": 25.0', '"created": true', '"added": [\n      "AVITO_PHOTO_SEARCH"',
     "applied", "applied 2, rejected 0, invalid 0", '"explicit_members_removed": 3', "key:  ", "line: checkout:"],
    ["assignments.commands ", "applied {'added': [], 'removed': [], 'unchanged': ['AVITO_X']"],
]
PAGES = {"README.md": README, "docs/operations.md": OPERATIONS}


def walkthrough(page: str) -> list[tuple[str, str]]:
    """The fenced blocks of every walkthrough section of `page`, in order."""
    text, blocks = (ROOT / page).read_text(encoding="utf-8"), []
    for section in text.split("<!-- walkthrough -->")[1:]:
        blocks += BLOCK.findall(section.split("<!-- /walkthrough -->")[0])
    return blocks


def test_the_readme_walkthrough_works_as_written(tmp_path):
    blocks = []
    for page, expected in PAGES.items():
        found = walkthrough(page)
        assert len(found) == len(expected), f"{page}: a block was added or removed: say what it prints here"
        blocks += zip(found, expected, strict=True)
    if not (ROOT / ".venv" / "bin" / "segmentctl").exists():
        pytest.fail("the walk-through runs .venv/bin/segmentctl: install the project with `make install-test`")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DATABASE_URL", "KAFKA_", "SEGMENTCTL_", "API_", "EMBEDDED_", "CONSUMER_",
                                  "EXPIRY_", "PUBLISHER_"))}
    env["DATA_DIR"] = str(tmp_path / "data")  # the only difference from a user's shell: a fresh stack
    try:
        with _make_run(env):
            for (language, code), expected in blocks:
                command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
                assert done.returncode == 0, f"{code}\nexited {done.returncode}:\n{done.stdout}\n{done.stderr}"
                for wanted in expected:
                    assert wanted in done.stdout, f"{code}\nprinted:\n{done.stdout}\nwithout {wanted!r}"
        # Ctrl-C, and at once `make run` again: the same documented addresses, found with no variable.
        with _make_run(env):
            written = orjson.loads((tmp_path / "data" / "stack.json").read_bytes())["settings"]
            assert written["kafka_bootstrap_servers"] == "127.0.0.1:9092"
            assert "@127.0.0.1:55432/" in written["database_url"]
            plain = subprocess.run([".venv/bin/segmentctl", "user", "update", "1000", "--add", "AVITO_DISCOUNT_30",
                                    "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert plain.returncode == 0 and '"status": "applied"' in plain.stdout, plain.stdout + plain.stderr
    finally:
        subprocess.run([sys.executable, "-m", "devstack", "clean"], cwd=ROOT, env=env, capture_output=True,
                       timeout=120)


@contextlib.contextmanager
def _make_run(env: dict[str, str]) -> Iterator[None]:
    """`make run` until Ctrl-C, which ends the block."""
    launcher = subprocess.Popen([sys.executable, "-m", "devstack", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready("http://127.0.0.1:8080", launcher, timeout=90)
        yield
    finally:
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0 and "stopped" in output, output
