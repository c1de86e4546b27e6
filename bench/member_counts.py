"""What keeping each segment's member count costs the writers (migration 0010: statement-level
triggers on memberships): the command consumer's throughput and the expiry worker's rate with the
count triggers on, as a ratio of the same run with them disabled on a database of its own. The
changes stream is off in both (its cost is bench/membership_changes.py's). Same broker, same
database server, same run; the rounds rotate which goes first.

    python -m bench.member_counts [--commands 100000] [--rows 200000] [--rounds 3]
"""

from __future__ import annotations

import functools
import sys
from datetime import UTC, datetime

import asyncpg

from bench import common
from bench.common import bench_environment, spread
from bench.consumer_workload import (
    consume_all,
    consumed_counter,
    generate,
    measure_until_stored,
    preload,
    seed_segments,
)
from bench.expiry import drain, seed_backlog
from bench.membership_changes import switch
from services.command_consumer.repository import open_pool
from shared.service import tune_gc

ON, OFF = "counted", "not counted"
TRIGGERS = ("memberships_counted_in", "memberships_counted_out")


async def counting(pool, on: bool) -> None:
    await switch(pool, False)  # the changes stream off: this measures the counts alone
    for trigger in TRIGGERS:
        await pool.execute(f"ALTER TABLE memberships {'ENABLE' if on else 'DISABLE'} TRIGGER {trigger}")


async def consumer_round(new, args, commands: list[dict], mode: str, label: str) -> float:
    settings, pool = await new(label)
    await counting(pool, mode == ON)
    await seed_segments(pool, args.segments)
    await preload(settings, commands)
    async with await open_pool(settings, settings.topic_partitions) as own:
        return await measure_until_stored(pool, len(commands), f"{label}: consumer, {mode}",
                                          functools.partial(consume_all, settings, own), counted=consumed_counter())


async def expiry_round(new, args, mode: str, label: str) -> float:
    settings, pool = await new(label)
    await counting(pool, mode == ON)
    await seed_backlog(pool, args.rows)
    async with asyncpg.create_pool(settings.database_url, min_size=args.concurrency + 1,
                                   max_size=args.concurrency + 2) as own:
        return await drain(own, args.batch_size, args.concurrency, args.rows)


async def main(args) -> None:
    tune_gc()  # the consumer runs in this process, as its service does
    commands = generate(args.commands, args.users, args.segments)
    consumer: dict[str, list[float]] = {ON: [], OFF: []}
    expiry: dict[str, list[float]] = {ON: [], OFF: []}
    async with bench_environment("counts", topic_partitions=args.partitions) as (_infra, new):
        for round_number in range(1, args.rounds + 1):
            for mode in (ON, OFF) if round_number % 2 else (OFF, ON):
                name = f"{'on' if mode == ON else 'off'}{round_number}"
                consumer[mode].append(await consumer_round(new, args, commands, mode, f"consumer_{name}"))
                expiry[mode].append(await expiry_round(new, args, mode, f"expiry_{name}"))
            print(f"  round {round_number}/{args.rounds}: counted / not: consumer "
                  f"{consumer[ON][-1] / consumer[OFF][-1]:.0%}, expiry {expiry[ON][-1] / expiry[OFF][-1]:.0%}",
                  file=sys.stderr, flush=True)

    def ratio(rates: dict[str, list[float]]) -> str:
        return spread([on / off for on, off in zip(rates[ON], rates[OFF], strict=True)], "{:.1%}")

    common.report(f"member counts ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions)", {
        "consumer, not counted": f"{spread(consumer[OFF])} commands/s ({len(commands):,} commands a round)",
        "consumer, counted / not": ratio(consumer),
        "expiry, not counted": f"{spread(expiry[OFF])} rows/s ({args.rows:,} past-due memberships a round)",
        "expiry, counted / not": ratio(expiry),
    })


def cli() -> None:
    common.cli(__doc__, main, commands=100_000, users=100_000, segments=50, partitions=8, rows=200_000,
               batch_size=10_000, concurrency=2, rounds=3)


if __name__ == "__main__":
    cli()
