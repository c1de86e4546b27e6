"""Tools beside `make run` (the benchmarks) take its servers when no variable names any; a stack
file whose launcher is gone is ignored."""

from __future__ import annotations

import json
import os

from devstack.infra import start_infra
from shared.settings import KafkaSettings


def write_stack(directory, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stack.json").write_text(json.dumps({"pid": pid, "settings": {
        "database_url": "postgresql://postgres@127.0.0.1:55999/postgres",
        "kafka_bootstrap_servers": "127.0.0.1:9999"}}))


def test_a_running_stacks_servers_are_found_and_a_variable_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    write_stack(tmp_path, os.getpid())
    infra = start_infra(running_stack_too=True)
    assert (infra.database_url, infra.kafka_bootstrap_servers) == (
        "postgresql://postgres@127.0.0.1:55999/postgres", "127.0.0.1:9999")
    assert infra.postgres is None and infra.kafka is None  # nothing of its own started
    assert KafkaSettings(_env_file=None).kafka_bootstrap_servers == "127.0.0.1:9999"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker.example:9092")
    assert KafkaSettings(_env_file=None).kafka_bootstrap_servers == "broker.example:9092"


def test_a_stack_file_whose_launcher_is_gone_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    write_stack(tmp_path, 2**22 + 12345)  # no such process
    assert KafkaSettings(_env_file=None).kafka_bootstrap_servers is None
