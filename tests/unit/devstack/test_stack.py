"""The launcher stops before starting anything when a port it uses is taken, and says which, by
whom and what moves it; `make clean` says only what it removed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import PortTaken, Stack
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def test_a_taken_port_is_named_with_its_holder_and_the_variable_that_moves_it(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = Settings(_env_file=None, data_dir=tmp_path, api_port=port, consumer_metrics_port=0,
                            expiry_metrics_port=0, publisher_metrics_port=0, database_url="postgresql://x/y",
                            kafka_bootstrap_servers="x:1")
        with pytest.raises(PortTaken) as stopped:
            Stack(settings, say=lambda *_: None).check_ports()
    message = str(stopped.value)
    assert f"port {port}, for the query API, is taken by PID {os.getpid()}" in message
    assert "set API_PORT to another port" in message and message.startswith("Nothing was started")


def test_clean_with_nothing_to_remove_says_so(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "devstack", "clean"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no embedded PostgreSQL data to remove") and "removed" not in done.stdout


@pytest.mark.parametrize("command", ["run", "clean"])
def test_a_second_launcher_on_the_same_data_refuses_to_start(tmp_path, command):
    (tmp_path / "stack.json").write_text(json.dumps({"pid": os.getpid(), "settings": {}}))  # a live launcher
    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "devstack", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert f"already running from this checkout (PID {os.getpid()})" in done.stderr
