"""A clone in a directory only its owner may enter (what `mktemp -d` makes, what /root is), under a
path with a space: the launcher reaches ready there, stops with Ctrl-C, leaves no process, and no
directory outside the clone changes mode or owner. The clone is of the committed history (git
clone), with the environment this session already installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from devstack.embedded import EmbeddedPostgres
from devstack.processes import free_port
from tests.conftest import CHECKOUT
from tests.e2e.launcher import alive, descendants, launcher_env, postgres_of, wait_ready
from tests.support import ancestry

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("DATABASE_URL") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                       reason="exercises the embedded defaults of make run"),
    pytest.mark.skipif(shutil.which("git") is None or not (CHECKOUT / ".git").exists(),
                       reason="needs git and a git checkout to clone"),
]


@pytest.fixture
def private_clone():
    private = Path(tempfile.mkdtemp(prefix="segmentation-clone-"))
    assert private.stat().st_mode & 0o777 == 0o700
    clone = private / "with space" / "segmentation service"
    clone.parent.mkdir()
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(CHECKOUT), str(clone)], check=True)
    try:
        yield clone
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_the_launcher_in_a_private_clone_runs_stops_and_changes_nothing_outside_it(private_clone, tmp_path):
    before = ancestry(private_clone.parent, CHECKOUT)
    postgres = EmbeddedPostgres(private_clone / ".data" / "postgres")  # where the clone's run keeps it
    api_port = free_port()
    env = launcher_env(tmp_path, api_port)
    del env["DATA_DIR"]  # the default, .data inside the clone
    launcher = subprocess.Popen([sys.executable, "-m", "devstack", "run"], cwd=private_clone, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            ready_after = wait_ready(f"http://127.0.0.1:{api_port}", launcher, timeout=90)
            started = descendants(launcher.pid) + postgres_of(postgres.data_dir)
            assert len(started) >= 6  # broker, four services, PostgreSQL
            launcher.send_signal(signal.SIGINT)
            output, _ = launcher.communicate(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                output, _ = launcher.communicate()
        assert launcher.returncode == 0, output
        assert "Warning" not in output, output  # nothing the user cannot act on
        time.sleep(0.5)
        left = [process for process in started if alive(process)]
        assert left == [], f"left running: {[process.cmdline() for process in left]}"
        assert postgres_of(postgres.data_dir) == []
        assert ancestry(private_clone.parent, CHECKOUT) == before
        print(f"private clone: ready after {ready_after:.1f}s, stopped, nothing left, no permission changed")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        postgres.remove()
