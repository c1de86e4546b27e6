"""What the benchmarks share: servers, a fresh database and topics, machine facts, percentiles."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded import EmbeddedPostgres, url_on_port, wait_until_replayed
from devstack.infra import fresh_database, start_infra
from services.expiry_worker.partitions import PartitionMaintainer
from shared.db import apply_migrations, create_pool
from shared.kafka import ensure_topics
from shared.logging import configure_logging
from shared.settings import Settings


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {autogroup()}"


def autogroup() -> str:
    """Whether the kernel groups scheduling by session. PostgreSQL puts every backend in a session
    of its own, so with autogroup on, a database sharing busy cores with its clients stalls now
    and then for tenths of a second (the README's benchmark notes)."""
    try:
        enabled = open("/proc/sys/kernel/sched_autogroup_enabled").read().strip() == "1"
    except OSError:
        return "kernel autogroup unknown"
    return "kernel autogroup ON (tail latencies include its stalls)" if enabled else "kernel autogroup off"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def paced(rate: float, count: int | None = None) -> AsyncIterator[int]:
    """0, 1, 2, … (`count` of them, or until the caller stops), each when its turn comes at a
    steady `rate` a second from the first: a late turn is not waited for, so the rate holds."""
    started = time.monotonic()
    index = 0
    while count is None or index < count:
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield index
        index += 1


async def cancel_and_stop(task: asyncio.Task, *clients) -> None:
    """Cancel a task and wait until it is gone, then stop the (Kafka) clients, in order."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for client in clients:
        await client.stop()


def scrape_histogram(metrics_url: str, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts (upper bound → count) from a /metrics page."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {float(sample.labels["le"]): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == f"{name}_bucket"}


def histogram_quantile(fraction: float, before: dict[float, float], after: dict[float, float]) -> float:
    """The quantile of what was observed between two scrapes, interpolated within its bucket as
    Prometheus's histogram_quantile() does: exact to the width of that bucket."""
    bounds = sorted(after)
    counts = [after[bound] - before.get(bound, 0.0) for bound in bounds]
    rank = fraction * counts[-1]
    for index, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
        if count >= rank:
            lower, below = (bounds[index - 1], counts[index - 1]) if index else (0.0, 0.0)
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
    raise ValueError("no observations between the two scrapes")


async def start_replica(infra, settings, cleanup: contextlib.AsyncExitStack) -> str:
    """A streaming replica of the embedded server, caught up; its URL for the bench database."""
    parent = Path(tempfile.mkdtemp(prefix="bench-replica-"))
    cleanup.callback(shutil.rmtree, parent, ignore_errors=True)  # after the server's own removal
    replica = EmbeddedPostgres(parent / "postgres", replica_of=infra.postgres)
    await asyncio.to_thread(replica.start)
    cleanup.push_async_callback(asyncio.to_thread, replica.remove)
    url = url_on_port(settings.database_url, replica.port)
    await wait_until_replayed(settings.database_url, url, timeout=120)
    return url


@contextlib.asynccontextmanager
async def bench_environment(name: str, **overrides) -> AsyncIterator[tuple]:
    """Servers (DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS, else a running `make run`'s, else embedded
    ones of its own), then per call of
    `new(label)` a migrated database (only up to the migrations before `migrated_before`, if
    given, or one given by its URL) and topics of its own. Services run in-process log as they
    would in production (JSON, here at WARNING so the figures stay readable)."""
    configure_logging("WARNING", "json")
    infra = await asyncio.to_thread(start_infra, True)
    pools = []
    try:
        if infra.postgres is not None:  # a server of its own, never one it was given
            await recycle_wal(infra.database_url)

        async def new(label: str, migrated_before: str | None = None, database_url: str | None = None):
            """`database_url`: an existing database (brought up to date) instead of a fresh one."""
            prefix = f"bench_{name}_{label}_{uuid.uuid4().hex[:6]}"
            if database_url:
                url = database_url
                await asyncio.to_thread(apply_migrations, url)
            else:
                url = await fresh_database(infra.database_url, prefix, migrated_before)
            settings = Settings(_env_file=None, database_url=url, kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                                segments_commands_topic=f"{prefix}.segments.commands",
                                assignments_commands_topic=f"{prefix}.assignments.commands",
                                results_topic=f"{prefix}.results", dlq_topic=f"{prefix}.dlq",
                                membership_changes_topic=f"{prefix}.changes",
                                consumer_group=f"{prefix}-group", consumer_metrics_port=0,
                                expiry_metrics_port=0, publisher_metrics_port=0, **overrides)
            await ensure_topics(settings)
            pool = await create_pool(url, min_size=1, max_size=12)
            pools.append(pool)
            # Partitions as the expiry worker makes them in a deployment (the inbox's for the days
            # around now, the coming months' of history).
            await PartitionMaintainer(pool, settings).run_once()
            return settings, pool

        yield infra, new
    finally:
        for pool in pools:
            await pool.close()
        await asyncio.to_thread(infra.close)


WARM_WAL_MB = 512


async def recycle_wal(admin_url: str, megabytes: int = WARM_WAL_MB) -> None:
    """Leave a fresh server with WAL files to recycle, as a server that has been running has.

    A fresh cluster has no spare WAL files: every 16 MB written, the COMMIT that crosses into the
    next file creates it, zero-filled and fsynced, and waits; a server that has run for a while
    renames old files at its checkpoints and writes into those. Sampling pg_stat_activity through
    a latency round showed backends waiting on that creation (WalInitWrite, WalInitSync). So the
    benchmark writes `megabytes` of WAL once, keeps its files (min_wal_size) and checkpoints: the
    rounds then write into recycled files, as in a deployment. Durability is untouched (fsync,
    synchronous_commit as they were)."""
    print(f"  the fresh database server: {megabytes} MB of WAL written once, its files kept to recycle…",
          file=sys.stderr, flush=True)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"ALTER SYSTEM SET min_wal_size = '{2 * megabytes}MB'")
        await conn.execute(f"ALTER SYSTEM SET max_wal_size = '{max(4 * megabytes, 1024)}MB'")
        await conn.execute("SELECT pg_reload_conf()")
        rows = megabytes * 1024 * 1024 // 300  # rows of ~300 bytes of WAL each
        await conn.execute(f"CREATE TABLE wal_warm_up AS SELECT g, repeat('x', 200) AS filler "
                           f"FROM generate_series(1, {rows}) AS g")
        await conn.execute("DROP TABLE wal_warm_up")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def past_history_partitions(conn: asyncpg.Connection, months: int) -> None:
    """The history partitions of the past `months` months, as partition maintenance made them
    when those months were current (a fresh database has them from this month on)."""
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for back in range(1, months + 1):
        first = (start - timedelta(days=back * 28)).replace(day=1)
        end = (first + timedelta(days=32)).replace(day=1)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS membership_history_p{first:%Y%m} PARTITION OF "
                           f"membership_history FOR VALUES FROM ('{first.isoformat()}') TO ('{end.isoformat()}')")


class Progress:
    """Progress on stderr: one line redrawn on a terminal, a line every few seconds elsewhere."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.started, self.shown = label, total, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.monotonic()
        finished = done >= self.total
        if now - self.shown < (0.5 if self.tty else 5.0) and not finished:
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        line = f"  {self.label}: {done:,}/{self.total:,} ({rate:,.0f}/s)"
        if self.tty:
            print("\r" + line, end="\n" if finished else "", flush=True, file=sys.stderr)
        else:
            print(line, flush=True, file=sys.stderr)


Option = int | float | tuple[int | float, str]  # a default, or a default and its help


def cli(doc: str, main: Callable[[argparse.Namespace], Awaitable[None]], **options: Option) -> None:
    """A benchmark's command line: `--name value` for each option (its type that of its default),
    `--help` from the script's docstring; prints the machine, then runs `main(args)`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, option in options.items():
        default, help_text = option if isinstance(option, tuple) else (option, None)
        help_text = help_text.replace("%", "%%") if help_text else None  # argparse formats help with %
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=help_text)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)

    async def run() -> None:
        # SIGTERM ends a run as Ctrl-C does: the servers and databases it started are stopped.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        await main(args)

    try:
        asyncio.run(run())
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise SystemExit(130) from None


def spread(values: list[float], form: str = "{:,.0f}", of: str = "rounds") -> str:
    """The median of a benchmark's rounds and their range: one quiet round is not a figure."""
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{form.format(middle)} (range {form.format(low)} to {form.format(high)}, {len(values)} {of})"


def report(title: str, lines: dict[str, str]) -> None:
    """A benchmark's result: its title, then one aligned `label : text` line each."""
    width = max(map(len, lines))
    print(f"\n{title}")
    for label, text in lines.items():
        print(f"  {label:<{width}} : {text}")
