"""create_segment with a 50 % rollout costs the same over 10,000,000 registered users as over 10:
coverage is computed at read time, so creating a segment writes no row per user.

    python -m bench.rollout_create [--users 10000000] [--segments 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench.common import bench_environment, machine
from services.command_consumer.batch import apply_batch
from services.command_consumer.parsing import RecordRef, ValidCommand
from shared.commands import CreateSegment


async def time_creates(pool, segments: int, label: str) -> float:
    """Seconds per create_segment through the consumer's batch path (one command per transaction)."""
    durations = []
    async with pool.acquire() as conn:
        for i in range(segments):
            command = CreateSegment(type="create_segment", slug=f"{label}_{i}", percent=50)
            record = RecordRef("segments.commands", 0, i, command.slug.encode(), b"")
            started = time.perf_counter()
            await apply_batch(conn, [ValidCommand(record, f"{label}-{i}", command)])
            durations.append(time.perf_counter() - started)
    durations.sort()
    return durations[len(durations) // 2]


async def main(args) -> None:
    print(f"machine: {machine()}")
    async with bench_environment("rollout") as (_infra, new):
        results = {}
        for users in (10, args.users):
            _settings, pool = await new(f"u{users}")
            print(f"  registering {users:,} users…", file=sys.stderr, flush=True)
            await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g", users)
            await pool.execute("VACUUM ANALYZE users")
            results[users] = await time_creates(pool, args.segments, "SEG")
            per_user_rows = await pool.fetchval("SELECT count(*) FROM memberships")
            assert per_user_rows == 0
    small, large = results[10], results[args.users]
    print(f"\ncreate_segment with percent 50 (median of {args.segments}, one transaction each)")
    print(f"  over {10:>12,} registered users: {small * 1000:.2f} ms")
    print(f"  over {args.users:>12,} registered users: {large * 1000:.2f} ms")
    print(f"  ratio: {large / small:.2f}x (the same cost: no per-user rows are written)")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--segments", type=int, default=200)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
