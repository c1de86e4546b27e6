"""Every command a user runs answers `--help` with its usage and exits 0: the services, segmentctl,
the launcher and every benchmark (a help text is %-formatted by argparse, so a stray "%" in one
turned `--help` into a traceback once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted([path.stem for path in (ROOT / "bench").glob("*.py")
                     if "\nif __name__ == \"__main__\":" in path.read_text()]  # the runnable modules
                    + [path.parent.name for path in (ROOT / "bench").glob("*/__main__.py")])  # and packages
COMMANDS = {module: [sys.executable, "-m", module] for module in (
    "services.command_consumer", "services.query_api", "services.expiry_worker", "devstack",
    *(f"bench.{name}" for name in BENCHMARKS))}
COMMANDS["segmentctl"] = [str(Path(sys.executable).parent / "segmentctl")]  # the installed script


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints_usage_and_exits_0(name):
    done = subprocess.run([*COMMANDS[name], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout.lower() and done.stderr == ""


def test_segmentctl_help_shows_no_type_tags():
    done = subprocess.run([*COMMANDS["segmentctl"], "tail", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "<bool>" not in done.stdout and "<str>" not in done.stdout, done.stdout
    assert "--status STATUS" in done.stdout
