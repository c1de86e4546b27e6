"""create_segment with a 50 % rollout costs the same over 10,000,000 registered users as over 10:
coverage is computed at read time, so creating a segment writes no row per user.

    python -m bench.rollout_create [--users 10000000] [--segments 200]
"""

from __future__ import annotations

import statistics
import sys
import time

from bench import common
from bench.common import bench_environment, spread
from services.command_consumer.batch import apply_batch
from services.command_consumer.parsing import RecordRef, ValidCommand
from shared.commands import CreateSegment


async def time_create(pool, slug: str) -> float:
    """Seconds for one create_segment through the consumer's batch path (its own transaction)."""
    command = CreateSegment(type="create_segment", slug=slug, percent=50)
    record = RecordRef("segments.commands", 0, 0, slug.encode(), b"")
    async with pool.acquire() as conn:
        started = time.perf_counter()
        await apply_batch(conn, [ValidCommand(record, slug, command)])
        return time.perf_counter() - started


async def main(args) -> None:
    async with bench_environment("rollout") as (_infra, new):
        pools = {}
        for users in (10, args.users):
            _settings, pool = await new(f"u{users}")
            print(f"  registering {users:,} users…", file=sys.stderr, flush=True)
            await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g", users)
            await pool.execute("VACUUM ANALYZE users")
            pools[users] = pool
        # Alternate the two databases so drift on the machine affects both alike.
        durations: dict[int, list[float]] = {users: [] for users in pools}
        for i in range(args.segments):
            for users, pool in pools.items():
                durations[users].append(await time_create(pool, f"SEGMENT_{i}"))
        for pool in pools.values():
            assert await pool.fetchval("SELECT count(*) FROM memberships") == 0  # no per-user rows
    # Rounds: consecutive slices of the alternating creates, each summarised by its median.
    size = args.segments // args.rounds
    rounds = {users: [statistics.median(values[i * size:(i + 1) * size]) * 1000 for i in range(args.rounds)]
              for users, values in durations.items()}
    ratios = [large / small for small, large in zip(rounds[10], rounds[args.users], strict=True)]
    common.report(f"create_segment with percent 50 ({args.segments} each, alternating databases, "
                  f"{args.rounds} rounds of {size}, each round's median)", {
        f"over {10:>12,} registered users": f"{spread(rounds[10], '{:.2f}')} ms",
        f"over {args.users:>12,} registered users": f"{spread(rounds[args.users], '{:.2f}')} ms",
        "ratio": f"{spread(ratios, '{:.2f}')}x (no per-user rows are written, so the user count does not matter)",
    })


def cli() -> None:
    common.cli(__doc__, main, users=10_000_000, segments=201, rounds=3)


if __name__ == "__main__":
    cli()
