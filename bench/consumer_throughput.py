"""Command consumer: sustained throughput against its own SQL-only limit (bench/sql_limit.py) and
the one-transaction-per-command baseline, tracing's cost, and end-to-end latency at a steady rate
with the consumer as its own process. Same broker, same database server, same run.

    python -m bench.consumer_throughput [--commands 200000] [--baseline-commands 20000]
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench import common
from bench.common import (
    Progress,
    bench_environment,
    cancel_and_stop,
    histogram_quantile,
    paced,
    percentile,
    scrape_histogram,
    spread,
)
from bench.disk import DiskWatch
from bench.simple_consumer import run_simple_consumer
from bench.sql_limit import RecordingPool, Transaction, replay
from devstack.otlp_sink import OtlpSink
from devstack.processes import free_port, stop_process
from services.command_consumer import metrics
from services.command_consumer.bootstrap import build_consumer
from services.command_consumer.repository import open_pool
from shared.db import create_pool
from shared.kafka import kafka_options
from shared.service import tune_gc


def generate(count: int, users: int, segments: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    slugs = [f"SEGMENT_{i}" for i in range(segments)]
    commands = []
    for i in range(count):
        picked = rng.sample(slugs, rng.randint(1, 3))
        field = "remove" if rng.random() < 0.2 else "add"
        commands.append({"type": "update_user_segments", "command_id": f"bench-{i}",
                         "user_id": rng.randint(1, users), field: picked})
    return commands


async def seed_segments(pool, segments: int) -> None:
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) "
                       "SELECT 'SEGMENT_' || g, now(), now() FROM generate_series(0, $1 - 1) AS g", segments)


def trace_context(rng: random.Random, sampled_share: float) -> list[tuple[str, bytes]]:
    """A W3C traceparent as a producer that traces `sampled_share` of its commands sends it."""
    flags = "01" if rng.random() < sampled_share else "00"
    return [("traceparent", f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) or 1:016x}-{flags}".encode())]


async def preload(settings, commands: list[dict], traced_share: float | None = None) -> None:
    """The commands on the assignments topic; with `traced_share`, each with the trace context of
    a producer that traces that share of them."""
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=20,
                                max_batch_size=256 * 1024, acks="all")
    await producer.start()
    progress = Progress("preloading", len(commands))
    rng = random.Random(3)
    try:
        deliveries = []
        for i, command in enumerate(commands, 1):
            headers = trace_context(rng, traced_share) if traced_share is not None else None
            deliveries.append(await producer.send(settings.assignments_commands_topic, orjson.dumps(command),
                                                  key=str(command["user_id"]).encode(), headers=headers))
            if i % 10_000 == 0:
                await asyncio.gather(*deliveries)
                deliveries.clear()
                progress.update(i)
        await asyncio.gather(*deliveries)
        progress.update(len(commands))
    finally:
        await producer.stop()


async def measure_until_stored(pool, total: int, label: str, run, cpu_seconds=None,
                               counted=None) -> float | tuple[float, float]:
    """Commands/s from the first outcome stored to the last one; with `cpu_seconds` (the CPU time
    the consumer has used so far), also the consumer's CPU microseconds a command over that span.
    `counted` gives the commands done so far without asking the database (an in-process
    consumer's own counter); else outcomes are counted in the database every 0.1 s, a scan that
    grows with the table and takes database time from the consumer it measures."""
    task = asyncio.create_task(run())
    progress = Progress(label, total)
    first = None
    try:
        while True:
            done = counted() if counted else await pool.fetchval("SELECT count(*) FROM command_outcomes")
            if done and first is None:
                first = (time.monotonic(), done, cpu_seconds() if cpu_seconds else 0.0)
            progress.update(done)
            if done >= total:
                rate = (total - first[1]) / (time.monotonic() - first[0])
                if cpu_seconds is None:
                    return rate
                return rate, (cpu_seconds() - first[2]) / (total - first[1]) * 1e6
            if task.done():
                task.result()
            # The span is timed at these checks: 0.1 s in a 12 s round is 1 %, so an in-process
            # counter (free to read) is checked more often.
            await asyncio.sleep(0.01 if counted else 0.1)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def consumed_counter():
    """Commands this process's consumers have finished (outcomes durable and published) since now."""
    def total() -> float:
        return sum(sample.value for metric in (metrics.COMMANDS, metrics.REPLAYED) for family in metric.collect()
                   for sample in family.samples if sample.name.endswith("_total"))

    start = total()
    return lambda: int(total() - start)


async def consume_all(settings, pool) -> None:
    consumer = build_consumer(settings, pool)
    try:
        await consumer.run()
    except asyncio.CancelledError:
        consumer.stop()
        raise


class ConsumerProcess:
    """The CPU time of the consumer process `consumer_process` runs, once it has started."""

    def __init__(self) -> None:
        self.process: psutil.Process | None = None

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


async def consumer_process(settings, extra_env: dict[str, str], watch: ConsumerProcess | None = None) -> None:
    """`python -m services.command_consumer` on these settings until cancelled (its /metrics
    served only when `extra_env` gives CONSUMER_METRICS_PORT)."""
    env = {**os.environ, **settings.to_env(), "CONSUMER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING", **extra_env}
    process = subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,  # noqa: ASYNC220
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if watch is not None:
        watch.process = psutil.Process(process.pid)
    try:
        while process.poll() is None:  # noqa: ASYNC110 - a process, not an event
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the consumer exited with status {process.returncode}")
    finally:
        await asyncio.to_thread(stop_process, process)


@dataclass
class Latencies:
    """Produce → outcome received, per command, and where that time went."""

    total: list[float] = field(default_factory=list)
    to_decision: list[float] = field(default_factory=list)  # sent → the consumer's processed_at
    to_outcome: list[float] = field(default_factory=list)  # processed_at → the outcome record's timestamp
    to_reader: list[float] = field(default_factory=list)  # the outcome record's timestamp → received here
    # The consumer's own histogram of record timestamp → outcome acknowledged, scraped before and after.
    published: tuple[dict[float, float], dict[float, float]] = ({}, {})
    broker: list[float] = field(default_factory=list)  # the broker alone, in the same round: broker_delivery
    disk_pause: float | None = None  # seconds: the longest a disk completed nothing with requests waiting

    def quantile(self, stage: str, fraction: float) -> float:
        """Seconds: a stage's quantile, `published` read from the consumer's histogram."""
        if stage == "published":
            return histogram_quantile(fraction, *self.published)
        return percentile(getattr(self, stage), fraction)


async def latency_at_steady_rate(settings, rate: int, seconds: float, read_back: bool = True) -> Latencies:
    """`rate` commands a second for `seconds` into `python -m services.command_consumer` (its own
    process, as deployed); the consumer's histogram of produce → outcome acknowledged is read
    before and after. With `read_back`, each outcome is also read from the results topic as it is
    published (the stages of the latency), by a reader whose fetches are load on the broker too."""
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    consuming = asyncio.create_task(consumer_process(settings, {"CONSUMER_METRICS_PORT": str(metrics_port)}))
    results = AIOKafkaConsumer(settings.results_topic, **kafka_options(settings),
                               auto_offset_reset="earliest", fetch_max_wait_ms=5) if read_back else None
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all", linger_ms=0)
    clients = [client for client in (results, producer) if client is not None]
    for client in clients:
        await client.start()
    sent_at: dict[str, float] = {}
    measured = Latencies()

    async def published_since(before: dict[float, float], count: int) -> dict[float, float]:
        """The consumer's histogram once `count` more outcomes are counted in it."""
        async with asyncio.timeout(60):
            while True:
                if consuming.done():
                    consuming.result()  # the consumer exited: say why
                    raise RuntimeError("the consumer exited")
                try:
                    scraped = await asyncio.to_thread(scrape_histogram, metrics_url, PUBLISHED)
                except OSError:  # not serving its metrics yet
                    scraped = {}
                if scraped and scraped[math.inf] - before.get(math.inf, 0.0) >= count:
                    return scraped
                await asyncio.sleep(0.1)

    try:
        # Warm up: wait until the consumer has joined and published a command's outcome.
        warm_up = {"type": "create_user", "user_id": 1, "command_id": "warm"}
        await producer.send_and_wait(settings.assignments_commands_topic, orjson.dumps(warm_up), key=b"1")
        await published_since({}, 1)

        async def read_results(expected: int):
            async for record in results:
                received = time.time()
                command_id = record.key.decode()
                if command_id in sent_at:
                    sent = sent_at[command_id]
                    processed = datetime.fromisoformat(orjson.loads(record.value)["processed_at"]).timestamp()
                    published = record.timestamp / 1000
                    measured.total.append(received - sent)
                    measured.to_decision.append(processed - sent)
                    measured.to_outcome.append(published - processed)
                    measured.to_reader.append(received - published)
                    if len(measured.total) >= expected:
                        return

        commands = generate(int(rate * seconds), users=100_000, segments=50, seed=2)
        before = await asyncio.to_thread(scrape_histogram, metrics_url, PUBLISHED)
        reader = asyncio.create_task(read_results(len(commands))) if results is not None else None
        progress = Progress(f"steady {rate}/s", len(commands))
        with DiskWatch() as disk:
            async for i in paced(rate, len(commands)):
                command = commands[i]
                sent_at[command["command_id"]] = time.time()
                await producer.send(settings.assignments_commands_topic, orjson.dumps(command),
                                    key=str(command["user_id"]).encode())
                progress.update(i + 1)
            if reader is not None:
                await asyncio.wait_for(reader, 60)
            measured.published = (before, await published_since(before, len(commands)))
        measured.disk_pause = disk.longest_pause()
        return measured
    finally:
        await cancel_and_stop(consuming, *clients)


async def broker_delivery(settings, rate: int, seconds: float) -> list[float]:
    """The broker alone, the floor of each of the two hops a command makes: `rate` records a
    second into a fresh topic of as many partitions, each read by one reader fetching as the
    consumer does (CONSUMER_FETCH_MAX_WAIT_MS); seconds from produce to received, per record."""
    topic = settings.assignments_commands_topic
    reader = AIOKafkaConsumer(topic, **kafka_options(settings), auto_offset_reset="earliest",
                              fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms)
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all", linger_ms=0)
    await reader.start()
    await producer.start()
    delays: list[float] = []
    try:
        total = int(rate * seconds)

        async def read() -> None:
            async for record in reader:
                delays.append(time.time() - record.timestamp / 1000)
                if len(delays) >= total:
                    return

        reading = asyncio.create_task(read())
        value = orjson.dumps(generate(1, users=100_000, segments=50, seed=3)[0])
        async for i in paced(rate, total):
            await producer.send(topic, value, key=str(i).encode())
        await asyncio.wait_for(reading, 60)
        return delays
    finally:
        await reader.stop()
        await producer.stop()


READ_BACK_STAGES = ("total", "to_decision", "to_outcome", "to_reader")  # measured only by reading outcomes back
PUBLISHED = "segmentation_command_published_seconds"  # services/command_consumer/metrics.py
TRACING_ROUNDS = (("process, tracing off", None), ("process, tracing 1%", 0.01), ("process, tracing 100%", 1.0))


def paired(traced: dict[str, list[float]], label: str) -> list[float]:
    """Each round's traced rate over the same round's untraced one."""
    return [on / off for on, off in zip(traced[label], traced["process, tracing off"], strict=True)]


async def main(args) -> None:
    tune_gc()  # as the consumer service does at startup: the consumer runs in this process
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    lines: dict[str, str] = {}
    async with bench_environment("consumer", topic_partitions=args.partitions) as (_infra, new):
        commands = generate(args.commands, args.users, args.segments)
        if "throughput" in parts:
            lines.update(await throughput(args, new, commands))
        if "tracing" in parts:
            lines.update(await tracing_rounds(args, new, commands[: args.tracing_commands]))
        if "latency" in parts:
            lines.update(await latency_rounds(args, new))
    common.report(f"consumer throughput ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions, "
                  f"{args.users:,} users, {args.segments} segments)", lines)


async def latency_rounds(args, new) -> dict[str, str]:
    """Rounds at a steady rate: the consumer alone ("published": its histogram, nothing else
    fetching), and with every outcome read back (the stages, and the reader's load on the broker),
    as --read-back says; then the broker alone in the same round."""
    modes = {0: [False], 1: [True], 2: [False, True]}[args.read_back]
    stages: dict[str, tuple[list[float], list[float]]] = {
        name: ([], []) for name in ("published", "published, read back", "broker", *READ_BACK_STAGES)}
    disk_pauses: list[float] = []  # ms, every consumer round's
    for round_number in range(1, args.rounds + 1):
        shift = (round_number - 1) % len(modes)
        for read_back in modes[shift:] + modes[:shift]:  # neither always first
            settings, pool = await new(f"latency{round_number}{'r' if read_back else ''}")
            await seed_segments(pool, args.segments)
            measured = await latency_at_steady_rate(settings, args.rate, args.latency_seconds, read_back)
            # line of the report → the stage of Latencies it shows
            shown = {"published, read back": "published", **{stage: stage for stage in READ_BACK_STAGES}} \
                if read_back else {"published": "published"}
            for name, stage in shown.items():
                p50s, p99s = stages[name]
                p50s.append(measured.quantile(stage, 0.5) * 1000)
                p99s.append(measured.quantile(stage, 0.99) * 1000)
            p50s, p99s = stages[next(iter(shown))]
            disk = ""
            if measured.disk_pause is not None:
                disk_pauses.append(measured.disk_pause * 1000)
                disk = f"; the disk's longest pause {disk_pauses[-1]:.0f} ms"
            print(f"    acknowledged p50 {p50s[-1]:.1f} ms, p99 {p99s[-1]:.1f} ms"
                  f"{' (outcomes read back)' if read_back else ''}{disk}", file=sys.stderr)
        floor_settings, _ = await new(f"broker{round_number}")
        broker = Latencies(broker=await broker_delivery(floor_settings, args.rate, args.latency_seconds))
        stages["broker"][0].append(broker.quantile("broker", 0.5) * 1000)
        stages["broker"][1].append(broker.quantile("broker", 0.99) * 1000)

    def line(stage: str) -> str:
        p50s, p99s = stages[stage]
        return f"p50 {spread(p50s, '{:.1f}')} ms, p99 {spread(p99s, '{:.1f}')} ms"

    lines = {}
    if False in modes:
        lines[f"latency at {args.rate}/s"] = (
            f"{line('published')}   (produce → outcome durable and acknowledged by Kafka, the consumer's own "
            "process and histogram, to its bucket's width, nothing else fetching; target p50 <= 20 ms, p99 <= 50 ms)")
    if True in modes:
        lines.update({
            f"latency at {args.rate}/s, outcomes read back": f"{line('published, read back')}   (the same, while a "
                                                             "reader fetches every outcome every 5 ms)",
            "  → received by the reader": f"{line('total')}   (the same, and the reader's fetch of the outcome: its "
                                          "fetch wait, and this load generator's turn)",
            "  sent → decided": f"{line('to_decision')}   (fetch, the partition's batch before, parse, SQL)",
            "  decided → outcome sent": f"{line('to_outcome')}   (the rest of the transaction, COMMIT's flush)",
            "  outcome sent → received": f"{line('to_reader')}   (acks=all, the reader's fetch)"})
    lines["  the broker alone"] = (f"{line('broker')}   (produce → fetched, one hop through the same broker at the "
                                   "same rate, no consumer: a command makes two)")
    if disk_pauses:
        lines["  the disk's longest pause"] = (
            f"{spread(disk_pauses, '{:.0f}')} ms   (the longest a disk completed no request with one waiting, "
            "/proc/diskstats every 10 ms through each round above: every COMMIT waits for the WAL's flush, so a "
            "round's tail is no shorter)")
    return lines


async def record_transactions(new, commands: list[dict], segments: int) -> list[Transaction]:
    """The transactions the consumer sends for these commands, written down in a run of its own
    (not timed), for the limit's replay (bench/sql_limit.py)."""
    settings, pool = await new("record")
    await seed_segments(pool, segments)
    await preload(settings, commands)
    async with await open_pool(settings, settings.topic_partitions) as own:  # the service's own pool, closed after
        recording = RecordingPool(own)
        await measure_until_stored(pool, len(commands), "recording the consumer's SQL",
                                   functools.partial(consume_all, settings, recording))
    return recording.transactions


async def throughput(args, new, commands: list[dict]) -> dict[str, str]:
    """Rounds of the batched consumer, its SQL-only limit and the simple loop, rotating which goes
    first."""
    baseline_commands = commands[: args.baseline_commands]
    transactions = await record_transactions(new, commands, args.segments)
    statements = sum(len(t.statements) + len(t.after) for t in transactions)
    rates: dict[str, list[float]] = {"batched": [], "limit": [], "simple": []}
    order = list(rates)
    for round_number in range(1, args.rounds + 1):
        shift = (round_number - 1) % len(order)
        for part in order[shift:] + order[:shift]:
            settings, pool = await new(f"{part}{round_number}")
            await seed_segments(pool, args.segments)
            label = f"round {round_number}/{args.rounds}"
            if part == "batched":
                await preload(settings, commands)
                # the pool the consumer service opens
                async with await open_pool(settings, settings.topic_partitions) as own:
                    run = functools.partial(consume_all, settings, own)
                    rates[part].append(await measure_until_stored(pool, len(commands), f"{label}: batched consumer",
                                                                  run, counted=consumed_counter()))
            elif part == "limit":
                print(f"  {label}: the limit, {len(transactions):,} recorded transactions from "
                      f"{args.partitions} connections…", file=sys.stderr, flush=True)
                # Connections as the consumer's: opened first, no reset round trip on release.
                async with await create_pool(settings.require_database_url(), min_size=args.partitions,
                                             max_size=args.partitions, reset_sessions=False) as replaying:
                    seconds = await replay(replaying, transactions, concurrency=args.partitions)
                rates[part].append(len(commands) / seconds)
            else:
                await preload(settings, baseline_commands)
                rates[part].append(await measure_until_stored(
                    pool, len(baseline_commands), f"{label}: simple loop",
                    functools.partial(run_simple_consumer, settings, pool, len(baseline_commands))))
            print(f"    {part}: {rates[part][-1]:,.0f} commands/s", file=sys.stderr, flush=True)
    batched, limit, simple = rates["batched"], rates["limit"], rates["simple"]
    return {"batched consumer": f"{spread(batched)} commands/s  ({len(commands):,} commands a round)",
            "SQL-only limit": f"{spread(limit)} commands/s  (the consumer's own {len(transactions):,} transactions, "
                              f"{statements:,} statements, replayed from {args.partitions} connections: no Kafka, "
                              "no Python between statements)",
            "batched / limit": f"{spread([b / lim for b, lim in zip(batched, limit, strict=True)], '{:.1%}')}   "
                               "(target >= 50%)",
            "simple loop": f"{spread(simple)} commands/s  ({len(baseline_commands):,} commands a round, one "
                           "transaction each)",
            "batched / simple": f"{spread([b / s for b, s in zip(batched, simple, strict=True)], '{:.1f}')}x   "
                                "(target >= 10x)"}


async def tracing_rounds(args, new, commands: list[dict]) -> dict[str, str]:
    """The consumer as its own process, as deployed: tracing off, and on at 1 % and 100 % of
    commands (spans over OTLP to a receiver in this process), in alternating rounds. The commands
    carry trace context as from producers that trace as much (the gateway, the client and
    segmentctl do), so each command's own sampling decision is part of the cost."""
    traced: dict[str, list[float]] = {label: [] for label, _ in TRACING_ROUNDS}
    cpu: dict[str, list[float]] = {label: [] for label, _ in TRACING_ROUNDS}
    with OtlpSink() as sink:
        for round_number in range(1, args.rounds + 1):
            shift = (round_number - 1) % len(TRACING_ROUNDS)  # no variant always runs first
            for label, ratio in TRACING_ROUNDS[shift:] + TRACING_ROUNDS[:shift]:
                extra = {} if ratio is None else {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
                settings, pool = await new(f"tracing_{str(ratio or 0).replace('.', '_')}_{round_number}")
                await seed_segments(pool, args.segments)
                await preload(settings, commands, traced_share=0.01 if ratio is None else ratio)
                watch = ConsumerProcess()
                rate, cpu_us = await measure_until_stored(
                    pool, len(commands), f"round {round_number}/{args.rounds}: {label}",
                    functools.partial(consumer_process, settings, extra, watch), watch.cpu_seconds)
                traced[label].append(rate)
                cpu[label].append(cpu_us)
                print(f"    {rate:,.0f} commands/s, consumer CPU {cpu_us:.1f} µs a command", file=sys.stderr)
    per_cpu = {label: [1 / value for value in values] for label, values in cpu.items()}  # commands a CPU µs
    return {**{label: f"{spread(rates)} commands/s, consumer CPU {spread(cpu[label], '{:.1f}')} µs a command"
               for label, rates in traced.items()},
            "tracing 1% / off": f"{spread(paired(traced, 'process, tracing 1%'), '{:.1%}')}   (target >= 97%)",
            "tracing 1% / off, commands a CPU second": spread(paired(per_cpu, 'process, tracing 1%'), '{:.1%}'),
            "tracing 100% / off": f"{spread(paired(traced, 'process, tracing 100%'), '{:.1%}')}   "
                                  "(every command traced)",
            "tracing 100% / off, commands a CPU second": spread(paired(per_cpu, 'process, tracing 100%'), '{:.1%}')}


PARTS = ("throughput", "tracing", "latency")


def cli() -> None:
    common.cli(__doc__, main, commands=200_000,
               baseline_commands=(20_000, "the baseline's rate is steady, so a sample of the same commands suffices"),
               tracing_commands=(100_000, "commands of each consumer-process round (tracing off, 1 %, 100 %)"),
               rounds=(3, "rounds of each part (the tracing comparison wants 5: --parts tracing --rounds 5)"),
               parts=(",".join(PARTS), "which parts to run, comma-separated"),
               users=100_000, segments=50, partitions=8, rate=500, latency_seconds=20.0,
               read_back=(2, "latency rounds: 0 the consumer's histogram alone; 1 also every outcome read back "
                             "(the stages; the reader's fetches load the broker); 2 a round of each in turn"))


if __name__ == "__main__":
    cli()
