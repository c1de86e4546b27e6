"""A real Prometheus for the alerting tests: Debian's package (`apt-get install prometheus`, which
.ci/run does), never a downloaded one. Without it those tests are skipped with PROMETHEUS_MISSING,
and the session's summary says so."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from devstack.processes import free_port, stop_process

PROMETHEUS_MISSING = ("no Prometheus: the alerting tests need Debian's prometheus package (apt-get install "
                      "prometheus), which brings promtool too")
ROOT = Path(__file__).resolve().parents[1]


def prometheus_path() -> str | None:
    return shutil.which("prometheus")


def promtool_path() -> str | None:
    return shutil.which("promtool")


def time_compressed(rules: str, window: str = "15s") -> str:
    """The production rules with every `for:` made immediate and every range window `window`, the
    thresholds untouched: what takes minutes in production takes seconds in a test."""
    rules = re.sub(r"for: \w+", "for: 0s", rules)
    return re.sub(r"\[\d+[smh]\]", f"[{window}]", rules)


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, targets: dict[str, str]) -> Iterator[str]:
    """Prometheus scraping `targets` (job name → host:port) every second and evaluating the
    time-compressed alerting rules every second; its base URL."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules = tmp_path / "alerts.yml"
    rules.write_text(time_compressed((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()]}))
    port = free_port()
    process = subprocess.Popen([prometheus_path(), f"--config.file={config}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        stop_process(process)


def firing(url: str) -> dict[str, list[dict]]:
    """The alerts firing now, by name."""
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    found: dict[str, list[dict]] = {}
    for alert in alerts:
        if alert["state"] == "firing":
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
    return found
