"""The outcome inbox stays bounded: commands at a steady rate for several outcome windows, the
consumer applying them and the expiry worker's partition maintenance running, with the inbox's
rows and size sampled as it goes. With a short window (1 minute here) the inbox should level off
at about one window of rows (plus the partition interval and the margin) and stop growing.

    python -m bench.inbox_soak [--commands 500000] [--seconds 180] [--window 60] [--interval 10]
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time

import orjson
from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import bench_environment
from bench.consumer_workload import seed_segments
from services.command_consumer.bootstrap import build_consumer
from services.expiry_worker.partitions import PartitionMaintainer
from shared.kafka import kafka_options

INBOX_SIZE = """SELECT count(*) AS partitions, sum(pg_total_relation_size(inhrelid)) AS bytes
                FROM pg_inherits WHERE inhparent = 'command_outcomes'::regclass"""


async def produce_steadily(settings, commands: int, seconds: float) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=5, acks="all")
    await producer.start()
    rng = random.Random(1)
    try:
        started, sent, tick = time.monotonic(), 0, 0.05
        while sent < commands:
            due = min(commands, int((time.monotonic() - started) / seconds * commands) + 1)
            deliveries = []
            for index in range(sent, due):
                user = rng.randint(1, 100_000)
                command = {"type": "update_user_segments", "command_id": f"soak-{index}", "user_id": user,
                           "add": [f"SEGMENT_{rng.randrange(50)}"]}
                deliveries.append(await producer.send(settings.assignments_commands_topic, orjson.dumps(command),
                                                      key=str(user).encode()))
            await asyncio.gather(*deliveries)
            sent = due
            await asyncio.sleep(tick)
    finally:
        await producer.stop()


async def main(args) -> None:
    overrides = {"outcome_retention": args.window, "outcome_partition_interval": args.interval,
                 "partition_maintenance_interval": args.maintenance}
    async with bench_environment("inbox", **overrides) as (_infra, new):
        settings, pool = await new("soak")
        await seed_segments(pool, 50)
        stopping = asyncio.Event()
        consumer = build_consumer(settings, pool)
        maintainer = PartitionMaintainer(pool, settings)
        tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(maintainer.run(stopping))]
        producing = asyncio.create_task(produce_steadily(settings, args.commands, args.seconds))
        samples = []  # (seconds since start, rows, partitions, bytes)
        started = time.monotonic()
        try:
            while not producing.done() or time.monotonic() - started < args.seconds + 10:
                rows = await pool.fetchval("SELECT count(*) FROM command_outcomes")
                size = await pool.fetchrow(INBOX_SIZE)
                samples.append((time.monotonic() - started, rows, size["partitions"], size["bytes"]))
                print(f"  {samples[-1][0]:6.0f} s: {rows:9,} outcome rows in {size['partitions']} partitions, "
                      f"{size['bytes'] / 2**20:7.1f} MiB", file=sys.stderr, flush=True)
                if producing.done():
                    producing.result()
                await asyncio.sleep(args.sample_seconds)
        finally:
            consumer.stop()
            stopping.set()
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
            await asyncio.gather(*tasks, return_exceptions=True)

    rate = args.commands / args.seconds
    bound = rate * (args.window + 2 * args.interval + args.maintenance)
    settled = [sample for sample in samples if sample[0] >= args.window + 3 * args.interval]
    first_half = [s for s in settled if s[0] < (settled[0][0] + settled[-1][0]) / 2] if settled else []
    second_half = [s for s in settled if s not in first_half]

    def peak(part, field):
        return max((s[field] for s in part), default=0)

    common.report(
        f"outcome inbox over a soak ({args.commands:,} commands over {args.seconds:.0f} s = {rate:,.0f}/s; window "
        f"{args.window} s, partitions of {args.interval} s, maintenance every {args.maintenance} s)", {
            "most outcome rows at once": f"{peak(samples, 1):,}   (one window's worth: {rate * args.window:,.0f}; "
                                         f"bound with interval and margin: {bound:,.0f})",
            "rows once settled, first / second half": f"{peak(first_half, 1):,} / {peak(second_half, 1):,}",
            "size once settled, first / second half": f"{peak(first_half, 3) / 2**20:.1f} / "
                                                      f"{peak(second_half, 3) / 2**20:.1f} MiB   (stops growing: "
                                                      "the second half no larger than the first)",
            "partitions at the end": f"{samples[-1][2] if samples else 0}",
        })


def cli() -> None:
    common.cli(__doc__, main, commands=500_000, seconds=180.0, window=60, interval=10, maintenance=5,
               sample_seconds=(5.0, "seconds between samples"))


if __name__ == "__main__":
    cli()
