"""The alerting rules against a real Prometheus scraping the running services, as deployed: the
DLQ, consumer-behind and service-down alerts fire when their condition is made real and clear
afterwards. The rules are the production ones made faster (`for:` immediate, 15 s windows, the
thresholds untouched: tests/prometheus_server.time_compressed)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from devstack.embedded import EmbeddedPostgres
from devstack.processes import free_port
from tests.e2e.launcher import descendants, launcher_env, wait_ready
from tests.prometheus_server import PROMETHEUS_MISSING, firing, prometheus_path, running_prometheus
from tests.support import memberships_locked

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(prometheus_path() is None, reason=PROMETHEUS_MISSING)]


def wait_until(check, what: str, timeout: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_dlq_consumer_behind_and_service_down_alerts_fire_and_clear(tmp_path):
    api_port = free_port()
    env = launcher_env(tmp_path, api_port)
    api = f"http://127.0.0.1:{api_port}"
    launcher = subprocess.Popen([sys.executable, "-m", "devstack", "run"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    postgres = EmbeddedPostgres(tmp_path / "data" / "postgres")
    try:
        wait_ready(api, launcher)
        stack = orjson.loads((tmp_path / "data" / "stack.json").read_bytes())["settings"]
        targets = {"query-api": f"127.0.0.1:{api_port}",
                   "command-consumer": f"127.0.0.1:{env['CONSUMER_METRICS_PORT']}",
                   "expiry-worker": f"127.0.0.1:{env['EXPIRY_METRICS_PORT']}"}
        with running_prometheus(tmp_path / "prometheus", targets) as prometheus:
            wait_until(lambda: not firing(prometheus) and _all_up(prometheus), "every target up, nothing firing", 60)

            # A malformed record: the DLQ alert fires, and clears once the window has passed.
            asyncio.run(_produce(stack["kafka_bootstrap_servers"], b"not json at all"))
            took = wait_until(lambda: "SegmentationDeadLetters" in firing(prometheus), "the DLQ alert", 60)
            print(f"DLQ alert fired {took:.0f}s after the record")
            wait_until(lambda: "SegmentationDeadLetters" not in firing(prometheus), "the DLQ alert clearing", 90)

            # A batch stuck on a row lock: its partition falls behind until the lock goes.
            _command(api, {"type": "create_segment", "slug": "HELD", "command_id": "held-1"})
            _command(api, {"type": "update_user_segments", "user_id": 77, "add": ["HELD"], "command_id": "held-2"})
            asyncio.run(_held_while(stack["database_url"], api, prometheus))
            wait_until(lambda: "SegmentationConsumerTimeBehind" not in firing(prometheus), "time behind clearing", 60)

            # A service that does not answer its scrapes.
            worker = next(p for p in descendants(launcher.pid) if "services.expiry_worker" in " ".join(p.cmdline()))
            worker.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: "SegmentationServiceDown" in firing(prometheus), "the service-down alert", 60)
                [down] = firing(prometheus)["SegmentationServiceDown"]
                assert down["labels"]["job"] == "expiry-worker"
            finally:
                worker.send_signal(signal.SIGCONT)
            wait_until(lambda: "SegmentationServiceDown" not in firing(prometheus), "service down clearing", 60)
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=60)
        postgres.remove()


def _all_up(prometheus: str) -> bool:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]
    return len(result) == 3 and all(sample["value"][1] == "1" for sample in result)


def _command(api: str, command: dict) -> None:
    assert httpx.post(f"{api}/commands", json=command, timeout=10).status_code == 202
    outcome = httpx.get(f"{api}/commands/{command['command_id']}", params={"wait": 20}, timeout=30).json()
    assert outcome["status"] == "applied", outcome


async def _produce(bootstrap: str, value: bytes, topic: str = "assignments.commands") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"1")
    finally:
        await producer.stop()


async def _held_while(database_url: str, api: str, prometheus: str) -> None:
    """User 77's rows locked from another connection while a command for it waits behind the lock."""
    async with memberships_locked(SimpleNamespace(database_url=database_url), 77):
        async with httpx.AsyncClient() as client:
            sent = await client.post(f"{api}/commands", json={"type": "update_user_segments", "user_id": 77,
                                                               "remove": ["HELD"], "command_id": "held-3"})
            assert sent.status_code == 202
        started = time.monotonic()
        while "SegmentationConsumerTimeBehind" not in await asyncio.to_thread(firing, prometheus):
            assert time.monotonic() - started < 120, "the consumer-behind alert did not fire"
            await asyncio.sleep(1)
        [behind] = (await asyncio.to_thread(firing, prometheus))["SegmentationConsumerTimeBehind"]
        assert behind["labels"]["topic"] == "assignments.commands"
        print(f"consumer-behind alert fired {time.monotonic() - started:.0f}s after the lock")
