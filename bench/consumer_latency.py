"""Command consumer: end-to-end latency at a steady rate, with the consumer as its own process, as
deployed, and the broker alone in the same rounds for the floor under it.

    python -m bench.consumer_latency [--rate 500] [--latency-seconds 20] [--rounds 3] [--read-back 2]
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
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
from bench.consumer_workload import consumer_process, generate, seed_segments
from bench.disk import DiskWatch
from devstack.processes import free_port
from shared.kafka import kafka_options


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


async def main(args) -> None:
    async with bench_environment("consumer-latency", topic_partitions=args.partitions) as (_infra, new):
        lines = await latency_rounds(args, new)
    common.report(f"consumer latency ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions, "
                  f"{args.segments} segments)", lines)


def cli() -> None:
    common.cli(__doc__, main, rounds=3, segments=50, partitions=8, rate=500, latency_seconds=20.0,
               read_back=(2, "0 the consumer's histogram alone; 1 also every outcome read back (the stages; the "
                             "reader's fetches load the broker); 2 a round of each in turn"))


if __name__ == "__main__":
    cli()
