"""The four services as real processes, the way `make run` starts them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from devstack.embedded import EmbeddedPostgres
from devstack.processes import free_port
from tests.e2e.launcher import alive, descendants, launcher_env, postgres_of, wait_ready
from tests.support import Publisher

pytestmark = pytest.mark.e2e


async def poll(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def test_commands_on_kafka_become_reads_over_http(stack):
    settings = stack.settings
    try:
        processes = list(stack.services.values())
        async with Publisher(settings) as publish, httpx.AsyncClient(base_url=stack.api_url()) as http:
            await publish.segment({"type": "create_segment", "slug": "AVITO_VOICE_MESSAGES", "command_id": "s1"})
            await publish.segment({"type": "create_segment", "slug": "AVITO_DISCOUNT_30", "command_id": "s2"})

            async def applied(command_id):
                response = await http.get(f"/commands/{command_id}")
                return response.json() if response.status_code == 200 else None

            assert (await poll(lambda: applied("s2")))["status"] == "applied"
            await publish.user({"type": "update_user_segments", "user_id": 1000, "command_id": "u1",
                                "add": ["AVITO_VOICE_MESSAGES", "AVITO_DISCOUNT_30"], "ttl_seconds": 2})
            outcome = await poll(lambda: applied("u1"))
            assert outcome["status"] == "applied"
            segments = (await http.get("/users/1000/segments")).json()["segments"]
            assert [s["slug"] for s in segments] == ["AVITO_DISCOUNT_30", "AVITO_VOICE_MESSAGES"]

            async def expired():
                return (await http.get("/users/1000/segments")).json()["segments"] == []

            assert await poll(expired, timeout=10)
            consumer_metrics = (await http.get(f"http://127.0.0.1:{settings.consumer_metrics_port}/metrics")).text
            assert 'segmentation_commands_total{status="applied",type="update_user_segments"} 1.0' in consumer_metrics
            # As under `make run`, the one consumer owns every command partition by lease.
            leased = len(settings.command_topics) * settings.topic_partitions
            assert f"segmentation_consumer_partitions_leased {leased}.0" in consumer_metrics

            async def removed_by_worker():
                text = (await http.get(f"http://127.0.0.1:{settings.expiry_metrics_port}/metrics")).text
                return "segmentation_memberships_expired_total 2.0" in text

            assert await poll(removed_by_worker, timeout=10)

            # A rejected command and an HTTP-published one leave log lines with their id and trace.
            trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            await publish.raw(settings.assignments_commands_topic,
                              {"type": "update_user_segments", "user_id": 7, "add": ["NOPE"], "command_id": "r1"},
                              key="7", headers=[("traceparent", trace.encode())])
            assert (await poll(lambda: applied("r1")))["status"] == "rejected"
            posted = await http.post("/commands", json={"type": "create_user", "user_id": 8, "command_id": "h1"},
                                     headers={"traceparent": trace})
            assert posted.status_code == 202
    finally:
        stack.close()  # again (the fixture's close is then a no-op): the exit codes are the point here
    assert all(p.poll() is not None for p in processes)
    # Each stopped on SIGTERM (uvicorn re-raises it after its graceful shutdown); none needed SIGKILL.
    assert all(p.returncode in (0, -signal.SIGTERM) for p in processes), [p.returncode for p in processes]

    logs = {name: [orjson.loads(line) for line in (stack.log_dir / f"{name}.log").read_text().splitlines()]
            for name in ("command_consumer", "query_api", "expiry_worker")}  # every line one JSON object
    assert all(line["service"] == name and "timestamp" in line and "level" in line
               for name, lines in logs.items() for line in lines)
    rejected = [line for line in logs["command_consumer"] if line.get("command_id") == "r1"]
    assert rejected and rejected[0]["event"] == "command rejected" and rejected[0]["traceparent"] == trace
    assert rejected[0]["code"] == "segment_not_found"
    published = [line for line in logs["query_api"] if line.get("command_id") == "h1"]
    assert published and published[0]["traceparent"] == trace
    assert any(line["event"] == "memberships expired" for line in logs["expiry_worker"])


@pytest.mark.skipif(bool(os.environ.get("DATABASE_URL") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="exercises the embedded defaults of make run")
def test_make_run_starts_everything_embedded_and_ctrl_c_leaves_nothing(tmp_path):
    postgres = EmbeddedPostgres(tmp_path / "data" / "postgres")  # where the launcher keeps it (as root: elsewhere)
    try:
        started = _run_kill_and_rerun_the_launcher(tmp_path, postgres)
        time.sleep(0.5)
        left = [p for p in started if alive(p)]
        assert left == [], f"left running: {[p.cmdline() for p in left]}"
        assert postgres_of(postgres.data_dir) == []
    finally:
        postgres.remove()  # its data gone (and stopped, if a failure above left it running)


def _run_kill_and_rerun_the_launcher(tmp_path: Path, postgres: EmbeddedPostgres) -> list[psutil.Process]:
    """Every process the second run started; the launcher has been stopped with Ctrl-C."""
    api_port = free_port()
    url = f"http://127.0.0.1:{api_port}"
    command = [sys.executable, "-m", "devstack", "run"]
    launcher = subprocess.Popen(command, env=launcher_env(tmp_path, api_port), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        ready_after = wait_ready(url, launcher)
        print(f"make run: API ready after {ready_after:.1f}s")
        started = descendants(launcher.pid) + postgres_of(postgres.data_dir)
        assert len(started) >= 6  # broker, four services, PostgreSQL (and its workers)
        response = httpx.post(f"{url}/commands", json={"type": "create_segment", "slug": "S", "percent": 100})
        assert response.status_code == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/users/42/segments").json()["segments"]:
                break
            time.sleep(0.1)
        assert httpx.get(f"{url}/users/42/segments").json()["segments"] == [
            {"slug": "S", "source": "auto", "expires_at": None}]

        # A killed launcher: its children get SIGTERM from the kernel (PDEATHSIG) and exit, but
        # PostgreSQL runs detached and stays as a stray; the next run stops it and starts afresh.
        children = descendants(launcher.pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, still_running = psutil.wait_procs(children, timeout=20)
        assert still_running == []
        strays = postgres_of(postgres.data_dir)
        assert strays
        launcher = subprocess.Popen(command, env=launcher_env(tmp_path, api_port), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        wait_ready(url, launcher)
        assert httpx.get(f"{url}/segments").json()["segments"][0]["slug"] == "S"  # data kept across runs
        assert not any(alive(p) for p in strays)
        started = descendants(launcher.pid) + postgres_of(postgres.data_dir)

        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, output
        assert "stopped" in output
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return started


def test_ctrl_c_then_an_immediate_make_run_keeps_its_addresses_and_tools_find_them(tmp_path):
    """Connections left in TIME-WAIT by the first run must not move the second run's ports; and
    segmentctl, with no variable naming a server, finds the running stack."""
    api_port = free_port()
    env = launcher_env(tmp_path, api_port)
    expected = {"kafka_bootstrap_servers": f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}",
                "postgres_port": env["EMBEDDED_POSTGRES_PORT"]}
    tool_env = {key: value for key, value in env.items()
                if not key.startswith(("KAFKA_", "SEGMENTCTL_", "DATABASE_URL"))}
    postgres = EmbeddedPostgres(tmp_path / "data" / "postgres")
    try:
        for round_number in (1, 2):
            launcher = subprocess.Popen([sys.executable, "-m", "devstack", "run"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
            try:
                wait_ready(f"http://127.0.0.1:{api_port}", launcher)
                written = orjson.loads((tmp_path / "data" / "stack.json").read_bytes())["settings"]
                assert written["kafka_bootstrap_servers"] == expected["kafka_bootstrap_servers"]
                assert f":{expected['postgres_port']}/" in written["database_url"]
                done = subprocess.run([str(Path(sys.executable).parent / "segmentctl"), "--timeout", "60", "segment",
                                       "create", f"FOUND_{round_number}", "--wait"], env=tool_env,
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
                assert '"status": "applied"' in done.stdout
            finally:
                launcher.send_signal(signal.SIGINT)  # Ctrl-C, and at once the next round
                output, _ = launcher.communicate(timeout=60)
            assert launcher.returncode == 0 and expected["kafka_bootstrap_servers"] in output, output
            # The first screen says how to try it and how to stop it.
            assert "Try it:" in output and "segmentctl user update" in output and "Press Ctrl-C" in output
        assert not (tmp_path / "data" / "stack.json").exists()  # gone with the stack
    finally:
        postgres.remove()


def test_a_taken_port_stops_make_run_before_anything_starts(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**launcher_env(tmp_path, free_port()), "EMBEDDED_KAFKA_PORT": str(port)}
        done = subprocess.run([sys.executable, "-m", "devstack", "run"], env=env, capture_output=True, text=True,
                              timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"port {port}, for the embedded Kafka broker, is taken by PID {os.getpid()}" in said, said
    assert "set EMBEDDED_KAFKA_PORT to another port" in said
    assert "migrations" not in said and "is running" not in said  # nothing started
    assert postgres_of(EmbeddedPostgres(tmp_path / "data" / "postgres").data_dir) == []
