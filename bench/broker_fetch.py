"""The embedded broker's cost of serving a reader at the tail of a growing topic.

One producer sends records at a steady rate into a fresh topic; one reader follows it as the
consumer does (fetch wait CONSUMER_FETCH_MAX_WAIT_MS); every window of a few seconds prints the
records the topic holds, the broker process's CPU (share of one core) and the delivery time
(produce → fetched, p50 and p99): median and range of the rounds, each on a broker of its own.
With Kafka the cost of a fetch at the tail does not depend on how much the partition holds; with
the embedded broker's memory storage it grows with it, which bounds what a latency benchmark on
it can show (README: "Latency at 500 commands/s"). Always on the embedded broker: its process is
what is measured.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import common
from bench.common import cancel_and_stop, paced, percentile, spread
from devstack.embedded import EmbeddedKafka
from shared.settings import Settings


@dataclass
class Window:
    held: int  # records in the topic at the window's end
    cpu: float  # the broker's CPU, share of one core
    p50: float  # delivery, ms
    p99: float


async def one_round(args) -> list[Window]:
    broker = EmbeddedKafka()
    bootstrap = await asyncio.to_thread(broker.start)
    try:
        process = psutil.Process(broker.process.pid)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic("growing", args.partitions, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        reader = AIOKafkaConsumer("growing", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                  fetch_max_wait_ms=Settings(_env_file=None).consumer_fetch_max_wait_ms)
        await producer.start()
        await reader.start()
        delays: list[float] = []

        async def read() -> None:
            async for record in reader:
                delays.append(time.time() - record.timestamp / 1000)

        reading = asyncio.create_task(read())
        sending = paced(args.rate)
        try:
            windows = []
            value = b"x" * args.record_bytes
            per_window = round(args.rate * args.window_seconds)
            sent = 0
            for _ in range(args.windows):
                cpu = process.cpu_times()
                window_started, busy_before = time.monotonic(), cpu.user + cpu.system
                delays.clear()
                for _ in range(per_window):
                    await producer.send("growing", value, key=str(await anext(sending)).encode())
                    sent += 1
                cpu = process.cpu_times()
                share = (cpu.user + cpu.system - busy_before) / (time.monotonic() - window_started)
                windows.append(Window(sent, share, percentile(delays, 0.5) * 1000, percentile(delays, 0.99) * 1000))
            return windows
        finally:
            await sending.aclose()
            await cancel_and_stop(reading, reader, producer)
    finally:
        await asyncio.to_thread(broker.stop)


async def main(args) -> None:
    rounds = []
    for number in range(1, args.rounds + 1):
        rounds.append(await one_round(args))
        print(f"    round {number}: {rounds[-1][-1].cpu:.0%} of a core at {rounds[-1][-1].held:,} records",
              file=sys.stderr)
    lines = {}
    for index, windows in enumerate(zip(*rounds, strict=True)):
        held = round(args.rate * args.window_seconds * (index + 1))
        lines[f"~{held:,} records held"] = (
            f"broker CPU {spread([w.cpu * 100 for w in windows], '{:.0f}')} % of a core; delivery "
            f"p50 {spread([w.p50 for w in windows], '{:.1f}')} ms, p99 {spread([w.p99 for w in windows], '{:.1f}')} ms")
    common.report(f"embedded broker, one reader at the tail ({args.rate}/s into {args.partitions} partitions, "
                  f"{args.record_bytes}-byte records)", lines)


def cli() -> None:
    common.cli(__doc__, main, rounds=3, rate=500, partitions=8, record_bytes=300, windows=8, window_seconds=5.0)


if __name__ == "__main__":
    cli()
