"""Starts the whole system: embedded servers unless configured, migrations, topics, four services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import psutil

from devstack.embedded import EmbeddedKafka, EmbeddedPostgres
from devstack.processes import die_with_parent, port_holder, port_is_free, run_coroutine, stop_process
from shared.db import apply_migrations
from shared.kafka import ensure_topics
from shared.settings import Settings
from shared.settings.base import STACK_FILE, redact

SERVICES = ("command_consumer", "query_api", "expiry_worker", "change_publisher")


class PortTaken(SystemExit):
    """A port the stack is documented to use is held by another program; nothing was started."""


class Stack:
    """Owns every process it starts; `close()` stops them all, servers last."""

    # What the services get unless the environment says otherwise. One consumer, restarted in
    # place when it dies: partition leases hand its partitions to the restarted process as soon as
    # the dead one's database session is gone, with no group rebalance waiting out its Kafka session.
    SERVICE_DEFAULTS = {"CONSUMER_PARTITION_OWNERSHIP": "lease"}

    def __init__(self, settings: Settings, *, log_dir: Path | None = None, say=print) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.log_dir = log_dir or self.data_dir / "logs"
        self.say = say
        self.env = dict(os.environ)
        for name, value in self.SERVICE_DEFAULTS.items():
            self.env.setdefault(name, value)
        self.kafka: EmbeddedKafka | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self._pid_file = self.data_dir / "stack.pids"
        self.stack_file = self.data_dir / STACK_FILE
        self._exit = ExitStack()

    # -- servers ---------------------------------------------------------------------------
    def start_servers(self, kafka: bool = True, services: bool = True) -> None:
        """The embedded servers the settings do not replace, on their documented ports; first, the
        strays of a killed earlier run are stopped and every port is checked (`services`: the
        ports of the services to start after), so a taken port stops everything before it starts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stop_strays()
        if not self.settings.database_url:
            self.postgres = EmbeddedPostgres(self.data_dir / "postgres", port=self.settings.embedded_postgres_port)
            self.postgres.stop_stray()
        if kafka and not self.settings.kafka_bootstrap_servers:
            self.kafka = EmbeddedKafka(port=self.settings.embedded_kafka_port, log_path=self.log_dir / "kafka.log")
        self.check_ports(services)
        if self.postgres:
            self.env["DATABASE_URL"] = self.postgres.start()
            self._exit.callback(self.postgres.stop)
        if self.kafka:
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.start()
            self._exit.callback(self.kafka.stop)
        self.settings = self.settings.model_copy(update={
            "database_url": self.env.get("DATABASE_URL"),
            "kafka_bootstrap_servers": self.env.get("KAFKA_BOOTSTRAP_SERVERS")})
        self._write_pids()

    def prepare(self) -> None:
        applied = apply_migrations(self.settings.require_database_url())
        self.say(f"migrations: {', '.join(applied) if applied else 'up to date'}")
        created = run_coroutine(ensure_topics(self.settings))
        self.say(f"topics: {', '.join(created) if created else 'present'}")

    def ports(self, services: bool = True) -> list[tuple[int, str, str]]:
        """(port, what listens there, the variable that moves it) for everything about to start."""
        wanted = []
        if self.postgres:
            wanted.append((self.postgres.port, "the embedded PostgreSQL", "EMBEDDED_POSTGRES_PORT"))
        if self.kafka:
            wanted.append((self.kafka.port, "the embedded Kafka broker", "EMBEDDED_KAFKA_PORT"))
        if services:
            wanted += [(self.settings.api_port, "the query API", "API_PORT"),
                       (self.settings.consumer_metrics_port, "the consumer's /metrics", "CONSUMER_METRICS_PORT"),
                       (self.settings.expiry_metrics_port, "the expiry worker's /metrics", "EXPIRY_METRICS_PORT"),
                       (self.settings.publisher_metrics_port, "the change publisher's /metrics",
                        "PUBLISHER_METRICS_PORT")]
        return [(port, what, variable) for port, what, variable in wanted if port]

    def check_ports(self, services: bool = True) -> None:
        taken = [(port, what, variable) for port, what, variable in self.ports(services) if not port_is_free(port)]
        if taken:
            lines = []
            for port, what, variable in taken:
                holder = port_holder(port)
                lines.append(f"  port {port}, for {what}, is taken" + (f" by {holder}" if holder else "")
                             + f": stop it, or set {variable} to another port")
            raise PortTaken("Nothing was started: a port this stack uses is taken.\n" + "\n".join(lines))

    def write_stack_file(self) -> None:
        """Where everything is, for the tools run from this checkout (shared.settings.base.running_stack)."""
        written = {"pid": os.getpid(), "settings": {
            "kafka_bootstrap_servers": self.env.get("KAFKA_BOOTSTRAP_SERVERS"),
            "database_url": self.env.get("DATABASE_URL"),
            "segmentctl_api_url": self.api_url()}}
        self.stack_file.write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        self._exit.callback(self.stack_file.unlink, missing_ok=True)

    # -- services --------------------------------------------------------------------------
    def start_services(self) -> None:
        for name in SERVICES:
            self.start_service(name)
        self._write_pids()

    def start_service(self, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=die_with_parent)
        self.services[name] = process
        return process

    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            for name, process in self.services.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode}; "
                                       f"see {self.log_dir / (name + '.log')}")
            try:
                with urllib.request.urlopen(self.api_url() + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError as error:
                last_error = error
            time.sleep(0.2)
        raise RuntimeError(f"the query API was not ready in {timeout}s: {last_error}")

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        for process in self.services.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.services.values():
            stop_process(process, timeout=15)
        self.services.clear()
        self._exit.close()
        self._pid_file.unlink(missing_ok=True)

    def _write_pids(self) -> None:
        pids = [p.pid for p in self.services.values()]
        if self.kafka and self.kafka.process:
            pids.append(self.kafka.process.pid)
        self._pid_file.write_text("\n".join(map(str, pids)))

    def _stop_strays(self) -> None:
        """Processes of a previous run that was killed: its services and broker (PostgreSQL is
        stopped by EmbeddedPostgres.start, which finds its postmaster.pid)."""
        if not self._pid_file.exists():
            return
        for line in self._pid_file.read_text().split():
            try:
                process = psutil.Process(int(line))
                command = " ".join(process.cmdline())
            except (ValueError, psutil.Error):
                continue
            if "services." in command or "tansu" in command:
                self.say(f"stopping a stray process of an earlier run: {line} {command[:80]}")
                process.terminate()
                try:
                    process.wait(10)
                except psutil.TimeoutExpired:
                    process.kill()
        self._pid_file.unlink(missing_ok=True)

    def summary(self) -> str:
        api = self.api_url()
        database = self.env.get("DATABASE_URL") or self.settings.database_url
        return "\n".join([
            "User segmentation service is running:",
            f"  query API        {api}",
            f"  API docs         {api}/docs",
            *([f"  web console      {api}/ui"] if self.settings.console_enabled else []),
            f"  API metrics      {api}/metrics",
            f"  consumer metrics {_metrics_url(self.settings.consumer_metrics_port)}",
            f"  expiry metrics   {_metrics_url(self.settings.expiry_metrics_port)}",
            f"  changes metrics  {_metrics_url(self.settings.publisher_metrics_port)}",
            f"  Kafka            {self.env.get('KAFKA_BOOTSTRAP_SERVERS')}"
            + (" (embedded, in memory)" if self.kafka else ""),
            f"  PostgreSQL       {redact(database)}" + (" (embedded, data in "
                                                      f"{self.postgres.data_dir})" if self.postgres else ""),
            f"  logs             {self.log_dir}",
            "Try it:",
            f"  curl -s -XPOST {api}/commands -d '{{\"type\": \"create_segment\", \"slug\": \"MY_FIRST\"}}'",
            "  .venv/bin/segmentctl user update 1000 --add MY_FIRST --wait",
            "  .venv/bin/segmentctl watch          # every entry and exit, live",
            *([f"  open {api}/ui in a browser"] if self.settings.console_enabled else []),
            "Press Ctrl-C to stop everything.",
        ])


def _metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics" if port else "disabled (port 0)"
