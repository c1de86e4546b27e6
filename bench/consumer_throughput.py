"""Command consumer: sustained throughput against its own SQL-only limit (bench/sql_limit.py) and
the one-transaction-per-command baseline (bench/simple_consumer.py). Same broker, same database
server, same run; the rounds rotate which goes first.

    python -m bench.consumer_throughput [--commands 200000] [--baseline-commands 20000] [--rounds 3]
"""

from __future__ import annotations

import functools
import sys
from datetime import UTC, datetime

from bench import common
from bench.common import (
    bench_environment,
    spread,
)
from bench.consumer_workload import (
    consume_all,
    consumed_counter,
    generate,
    measure_until_stored,
    preload,
    seed_segments,
)
from bench.simple_consumer import run_simple_consumer
from bench.sql_limit import RecordingPool, Transaction, replay
from services.command_consumer.repository import open_pool
from shared.db import create_pool
from shared.service import tune_gc


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


async def main(args) -> None:
    tune_gc()  # as the consumer service does at startup: the consumer runs in this process
    async with bench_environment("consumer", topic_partitions=args.partitions) as (_infra, new):
        lines = await throughput(args, new, generate(args.commands, args.users, args.segments))
    common.report(f"consumer throughput ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions, "
                  f"{args.users:,} users, {args.segments} segments)", lines)


def cli() -> None:
    common.cli(__doc__, main, commands=200_000,
               baseline_commands=(20_000, "the baseline's rate is steady, so a sample of the same commands suffices"),
               rounds=3, users=100_000, segments=50, partitions=8)


if __name__ == "__main__":
    cli()
