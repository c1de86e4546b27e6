"""A pg_auto_failover formation on this machine, for the failover tests and bench/failover.py: a
monitor and two PostgreSQL 15 nodes with synchronous replication (or one node alone, the same
server without a standby), each node run by its keeper (`pg_autoctl run`) as in production.
Debian's packages provide it (postgresql-15-auto-failover, pg-auto-failover-cli; .ci/run installs
them); without them the tests are skipped with HA_MISSING and the session's summary says so.

pg_auto_failover over Patroni: it is one package and one binary with no consensus store to run
beside it (Patroni needs etcd), its monitor decides promotions on health checks whose timing the
tests can shorten, and it manages synchronous replication itself (`number_sync_standbys`).

As root, the servers run as the `postgres` account Debian's packages create, in a directory of
their own made for it under the system's temporary directory; nothing else changes hands.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from devstack.processes import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
HA_MISSING = ("no pg_auto_failover: the failover tests need Debian's postgresql-15-auto-failover and "
              "pg-auto-failover-cli packages (apt-get install postgresql-15-auto-failover pg-auto-failover-cli)")
DATABASE = "segmentation"
# Fast decisions for a test: a node is unhealthy after about 2 s without answers, and a standby
# promoted while the old primary cannot be told to step down waits 3 s before taking writes.
MONITOR_SETTINGS = {"health_check_period": 1000, "health_check_timeout": 1000, "health_check_max_retries": 1,
                    "health_check_retry_delay": 500, "node_considered_unhealthy_timeout": 2000,
                    "startup_grace_period": 1000, "primary_demote_timeout": 3000}


def missing() -> str | None:
    """Why the formation cannot run here, or None."""
    extension = Path("/usr/share/postgresql/15/extension/pgautofailover.control")
    if shutil.which("pg_autoctl") is None or not (PG_BIN / "postgres").exists() or not extension.exists():
        return HA_MISSING
    return None


class AutoFailoverCluster:
    def __init__(self, nodes: int = 2) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="segmentation-ha-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.base, self.user)
        self.nodes = [f"node{number}" for number in range(1, nodes + 1)]
        self.ports = {"monitor": free_port(), **{node: free_port() for node in self.nodes}}
        self.keepers: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": f"{PG_BIN}:{os.environ['PATH']}", "PG_CONFIG": str(PG_BIN / "pg_config"),
                    "XDG_CONFIG_HOME": str(self.base / "config"), "XDG_DATA_HOME": str(self.base / "data"),
                    "HOME": str(self.base)}

    # -- the formation -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Both nodes, writes to whichever is primary."""
        hosts = ",".join(f"127.0.0.1:{self.ports[node]}" for node in self.nodes)
        return f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"

    def node_url(self, node: str, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports[node]}/{database}"

    def start(self, timeout: float = 120) -> None:
        monitor = self.base / "monitor"
        self._autoctl("create", "monitor", "--pgdata", str(monitor), "--pgport", str(self.ports["monitor"]),
                      "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl")
        self._run_keeper("monitor")
        self._wait(lambda: self._monitor_answers(), "the monitor", timeout)
        for name, value in MONITOR_SETTINGS.items():
            self._psql("monitor", "pg_auto_failover", f"ALTER SYSTEM SET pgautofailover.{name} = {value}")
        self._psql("monitor", "pg_auto_failover", "SELECT pg_reload_conf()")
        for node in self.nodes:  # the first becomes the primary, the second its standby
            self.keepers[node] = self._spawn(
                node, "create", "postgres", "--pgdata", str(self.base / node), "--pgport", str(self.ports[node]),
                "--hostname", "127.0.0.1", "--monitor", self.monitor_url, "--auth", "trust", "--no-ssl",
                "--dbname", DATABASE, "--pg-hba-lan", "--run")
            self._wait(lambda node=node: self.reported(node) in ("single", "primary", "secondary"), f"{node} to join",
                       timeout)
            if node == "node1" and len(self.nodes) > 1:
                # The standby's base backup starts with a checkpoint, spread over most of
                # checkpoint_timeout by default: finished at once here.
                self._psql(node, "postgres", "ALTER SYSTEM SET checkpoint_completion_target = 0")
                self._psql(node, "postgres", "SELECT pg_reload_conf()")
        if len(self.nodes) > 1:
            self.wait_for_standby(timeout)

    @property
    def monitor_url(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.ports['monitor']}/pg_auto_failover?sslmode=disable"

    def states(self) -> dict[str, tuple[str, str]]:
        """Each node's (reported, assigned) state as the monitor sees them."""
        result = self._autoctl("show", "state", "--pgdata", str(self.base / "monitor"), "--json", check=False)
        try:
            rows = json.loads(result.stdout)
        except json.JSONDecodeError:
            return {}
        return {row["nodename"]: (row["current_group_state"], row["assigned_group_state"]) for row in rows}

    def reported(self, node: str) -> str | None:
        return self.states().get(f"node_{node[-1]}", (None, None))[0]

    def primary(self) -> str | None:
        """The node taking writes: `primary` with its standby, `wait_primary` alone (its standby
        lost, replication no longer synchronous until one is back), `single` in a formation of one."""
        for name, (reported, assigned) in self.states().items():
            if reported == assigned and reported in ("primary", "wait_primary", "single"):
                return f"node{name[-1]}"
        return None

    def wait_for_standby(self, timeout: float = 120) -> str:
        """Until one node is primary and the other its synchronous secondary; returns the primary."""
        def settled() -> bool:
            states = self.states()
            return sorted(reported for reported, assigned in states.values() if reported == assigned) == [
                "primary", "secondary"]
        self._wait(settled, "a primary with its secondary", timeout)
        return self.primary()

    # -- faults ---------------------------------------------------------------------------------
    def kill(self, node: str) -> None:
        """The node dies at once: its keeper, the keeper's services and its postmaster SIGKILLed
        (the keeper's services would start PostgreSQL again)."""
        keeper = self.keepers.pop(node, None)
        if keeper is not None:  # its session: the keeper and the services it forked
            with contextlib.suppress(ProcessLookupError):
                os.killpg(keeper.pid, signal.SIGKILL)
            keeper.wait()
        for process in self._processes(self.base / node):
            with contextlib.suppress(psutil.Error):
                process.kill()

    def make_asynchronous(self, primary: str) -> None:
        """Commits acknowledged by the primary alone, before its standby has them (as while a
        formation's standby is away): `synchronous_commit = local` over the engine's settings."""
        self._psql(primary, "postgres", "ALTER SYSTEM SET synchronous_commit = local")
        self._psql(primary, "postgres", "SELECT pg_reload_conf()")

    def hold_back(self, standby: str, timeout: float = 30) -> None:
        """The standby cut off from its primary's WAL (its primary_conninfo pointed nowhere): what
        the primary commits from now on is on the primary only."""
        self._psql(standby, "postgres", "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'")
        self._psql(standby, "postgres", "SELECT pg_reload_conf()")
        self._wait(lambda: self._psql(standby, "postgres", "SELECT count(*) FROM pg_stat_wal_receiver "
                                                           "WHERE status = 'streaming'") == "0",
                   f"{standby} to stop receiving", timeout)

    def restart(self, node: str) -> None:
        """The node's keeper started again: it rejoins the formation (as a standby, if another was promoted)."""
        self._run_keeper(node)

    def stop(self) -> None:
        for keeper in list(self.keepers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(keeper.pid, signal.SIGTERM)
        for keeper in list(self.keepers.values()):
            try:
                keeper.wait(20)
            except subprocess.TimeoutExpired:
                keeper.kill()
                keeper.wait()
        for node in (*self.nodes, "monitor"):
            self.kill(node)
        shutil.rmtree(self.base, ignore_errors=True)

    @staticmethod
    def _processes(data_dir: Path) -> list[psutil.Process]:
        """Every process serving `data_dir`: keepers, their services, postmasters and backends."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or ())
            if str(data_dir) in command:
                found.append(process)
        return found

    # -- helpers ----------------------------------------------------------------------------------
    def _run_keeper(self, node: str) -> None:
        self.keepers[node] = self._spawn(node, "run", "--pgdata", str(self.base / node))

    def _spawn(self, node: str, *args: str) -> subprocess.Popen:
        log = open(self.base / f"{node}.log", "ab")
        try:
            return subprocess.Popen(["pg_autoctl", *args], env=self.env, user=self.user, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base,
                                    start_new_session=True)
        finally:
            log.close()

    def _autoctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["pg_autoctl", *args], env=self.env, user=self.user, capture_output=True, text=True,
                                errors="replace", cwd=self.base, timeout=120)
        if check and result.returncode:
            raise RuntimeError(f"pg_autoctl {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
        return result

    def _psql(self, node: str, database: str, sql: str) -> str:
        result = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.ports[node]), "-U",
                                 "postgres", "-d", database, "-Atc", sql], capture_output=True, text=True, timeout=30)
        if result.returncode:
            raise RuntimeError(f"psql on {node}: {result.stderr}")
        return result.stdout.strip()

    def _monitor_answers(self) -> bool:
        try:
            return self._psql("monitor", "pg_auto_failover", "SELECT 1") == "1"
        except RuntimeError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in sorted(self.base.glob("*.log")))

    def _wait(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {what}; states {self.states()}\n{self.log_tail()}")
            time.sleep(0.2)
