"""Driving `python -m devstack run` (what `make run` calls) from a test: its environment, its
readiness, and the processes it started."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from devstack.processes import free_port


def launcher_env(tmp_path: Path, api_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env.update(DATA_DIR=str(tmp_path / "data"), API_PORT=str(api_port), CONSUMER_METRICS_PORT=str(free_port()),
               EXPIRY_METRICS_PORT=str(free_port()), PUBLISHER_METRICS_PORT=str(free_port()),
               EMBEDDED_KAFKA_PORT=str(free_port()),
               EMBEDDED_POSTGRES_PORT=str(free_port()))
    return env


def wait_ready(url: str, launcher: subprocess.Popen, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if launcher.poll() is not None:
            said = launcher.stdout.read() if launcher.stdout else ""
            raise AssertionError(f"the launcher exited with {launcher.returncode} before the API was ready:\n{said}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/readyz not 200 within {timeout}s")


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a detached server that exited may wait to be reaped by PID 1)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def postgres_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if alive(process) and any(str(data_dir) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found
