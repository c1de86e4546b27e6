"""The web console at size: 10,000 segments (100 with a rollout), 1,000,000 users with 3,000,000
explicit memberships (segment sizes skewed: a few segments hold most members), 5,000,000 history
rows over the last 3 months and 200,000 command outcomes over the last 2 days, seeded in the
database server itself. Then, against the query API as a process (one worker), the time of

- the first page of the segments list;
- a segment's page with its 90-day chart (a random segment, weighted like the memberships);
- a user's page (a random user, with this month's history);
- the first page of the activity list;

each as the median and p99 of sequential requests; and the hot read (GET /users/{id}/segments,
wrk) on the same API with the console off (UI_ENABLED=false, a second process), on, and on while
people use it (--views page views a second, spread over the four kinds), each as a ratio of the
console off. Every figure is the median and range of --rounds rounds.

    python -m bench.console [--rounds 3] [--requests 200] [--users 1000000] [--history 5000000] [--views 2]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import sys
import time

import aiohttp
import asyncpg

from bench import common
from bench.common import Progress, bench_environment, percentile, spread
from bench.read_throughput import serve, wrk
from devstack.processes import free_port, stop_process

SEGMENTS, ROLLOUT_SEGMENTS, OUTCOMES = 10_000, 100, 200_000
PAGE_TARGET_MEDIAN_MS, PAGE_TARGET_P99_MS = 100, 300


async def seed(database_url: str, users: int, memberships_per_user: int, history: int) -> None:
    """All in the server (generate_series), on a connection without a statement timeout, the
    changes stream off for the session: the seed is not a stream of changes anyone subscribed to."""
    steps = Progress("seeding (steps)", 6)
    conn = await asyncpg.connect(database_url, command_timeout=None)
    try:
        await conn.execute("SET segmentation.membership_changes = off")
        await conn.execute(
            """INSERT INTO segments (slug, percent, description, created_at, updated_at)
               SELECT 'EXP_' || lpad(g::text, 5, '0'), CASE WHEN g < $2 THEN 1 + g % 50 ELSE 0 END,
                      'experiment ' || g || CASE WHEN g % 3 = 0 THEN ' of the search team' ELSE '' END,
                      now() - interval '120 days', now()
               FROM generate_series(0, $1 - 1) AS g""", SEGMENTS, ROLLOUT_SEGMENTS)
        steps.update(1)
        await conn.execute("INSERT INTO users SELECT g, now() - interval '120 days' FROM generate_series(1, $1) AS g",
                           users)
        steps.update(2)
        # power(random(), 3): a few low-numbered segments hold most of the members.
        await conn.execute(
            """INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
               SELECT u, (SELECT min(id) FROM segments) + floor(power(random(), 3) * $2)::int,
                      now() - random() * interval '90 days',
                      CASE WHEN k = 0 THEN now() + interval '30 days' END
               FROM generate_series(1, $1) AS u, generate_series(0, $3 - 1) AS k
               ON CONFLICT DO NOTHING""", users, SEGMENTS, memberships_per_user)
        # The 40 days of size changes the list's trends read, as the expiry worker's folds keep them.
        await conn.execute(
            """INSERT INTO segment_member_days (segment_id, day, change)
               SELECT s.id, (now() AT TIME ZONE 'UTC')::date - back, floor(random() * 50)::int - 10
               FROM segments s, generate_series(1, 40) AS back""")
        steps.update(3)
        await common.past_history_partitions(conn, 3)
        await conn.execute(
            """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
               SELECT 1 + floor(random() * $1)::bigint,
                      'EXP_' || lpad(floor(power(random(), 3) * $2)::int::text, 5, '0'),
                      CASE WHEN g % 10 < 7 THEN 'I' ELSE 'D' END, now() - random() * interval '90 days',
                      'manual', CASE WHEN g % 10 < 9 THEN 'manual' ELSE 'ttl' END
               FROM generate_series(1, $3) AS g""", users, SEGMENTS, history)
        steps.update(4)
        await conn.execute(
            """INSERT INTO command_outcomes (command_id, type, status, error, result, processed_at, source_topic,
                                             source_partition, source_offset, actor, recorded_at, subject_user_id)
               SELECT 'bench-' || g, 'update_user_segments', CASE WHEN g % 50 = 0 THEN 'rejected' ELSE 'applied' END,
                      CASE WHEN g % 50 = 0 THEN '{"code": "segment_not_found", "message": "no live segment"}'::jsonb
                      END, NULL, t, 'assignments.commands', g % 8, g, CASE WHEN g % 7 = 0 THEN 'ana' END, t,
                      1 + g % $2
               FROM generate_series(1, $1) AS g, LATERAL (SELECT now() - random() * interval '2 days' AS t) AS r""",
            OUTCOMES, users)
        steps.update(5)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")  # the load's pages written now, not during the rounds
        steps.update(6)
    finally:
        await conn.close()


def page_urls(kind: str, users: int, rng: random.Random) -> str:
    if kind == "segments list":
        return "/ui/segments"
    if kind == "segment, 90 days":
        return f"/ui/segments/EXP_{int(rng.random() ** 3 * SEGMENTS):05d}?period=90d"
    if kind == "user":
        return f"/ui/users/{rng.randint(1, users)}"
    return "/ui/activity"


KINDS = ("segments list", "segment, 90 days", "user", "activity")


async def page_times(port: int, users: int, requests: int, seed_value: int) -> dict[str, list[float]]:
    """Each page kind `requests` times, one request at a time: milliseconds each."""
    rng = random.Random(seed_value)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        for kind in KINDS:
            for _ in range(5):  # warm: connections, prepared statements, the pages' first reads
                async with session.get(page_urls(kind, users, rng)) as response:
                    await response.read()
            for _ in range(requests):
                started = time.perf_counter()
                async with session.get(page_urls(kind, users, rng)) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{kind}: {response.status} {(await response.text())[:300]}")
                times[kind].append((time.perf_counter() - started) * 1000)
    return times


async def console_use(port: int, users: int, views: float, stop: asyncio.Event) -> int:
    """Console pages at `views` a second, as people open them, until stopped."""
    rng, served = random.Random(7), 0
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        started = time.monotonic()
        while not stop.is_set():
            async with session.get(page_urls(KINDS[served % len(KINDS)], users, rng)) as response:
                await response.read()
            served += 1
            await asyncio.sleep(max(0.0, started + served / views - time.monotonic()))
    return served


async def hot_read(port: int, pid: int, users: int, duration: int, views: float = 0) -> dict:
    stop = asyncio.Event()
    use = asyncio.create_task(console_use(port, users, views, stop)) if views else None
    try:
        return await asyncio.to_thread(wrk, port, users, duration, 32, (), pid)
    finally:
        stop.set()
        if use is not None:
            await use


async def main(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for this benchmark: apt-get install wrk")
    async with bench_environment("console") as (_infra, new):
        settings, _pool = await new("data")
        await seed(settings.database_url, args.users, 3, args.history)
        port, off_port = free_port(), free_port()
        env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", "API_WORKERS": "1"}
        api = serve([sys.executable, "-m", "services.query_api", "--port", str(port)],
                    {**env, "API_PORT": str(port)}, port)
        off = serve([sys.executable, "-m", "services.query_api", "--port", str(off_port)],
                    {**env, "API_PORT": str(off_port), "UI_ENABLED": "false"}, off_port)
        pages: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
        reads: dict[str, list[dict]] = {"console off": [], "console on": [], "console in use": []}
        try:
            for round_number in range(1, args.rounds + 1):
                times = await page_times(port, args.users, args.requests, round_number)
                for kind, values in times.items():
                    pages[kind].append((statistics.median(values), percentile(values, 0.99)))
                # In turn first and last: a figure measured later in a round is not favoured.
                order = [("console off", off_port, off.pid, 0), ("console on", port, api.pid, 0),
                         ("console in use", port, api.pid, args.views)]
                for name, at, pid, views in order if round_number % 2 else order[::-1]:
                    reads[name].append(await hot_read(at, pid, args.users, args.duration, views))
                print(f"  round {round_number}/{args.rounds}: " + ", ".join(
                    f"{kind} p50 {pages[kind][-1][0]:.0f} ms p99 {pages[kind][-1][1]:.0f} ms" for kind in KINDS)
                    + "; hot read " + ", ".join(f"{name} {runs[-1]['rps']:,.0f} req/s" for name, runs in reads.items()),
                    file=sys.stderr, flush=True)
        finally:
            stop_process(api)
            stop_process(off)
    lines = {}
    for kind in KINDS:
        medians, tails = [m for m, _ in pages[kind]], [p for _, p in pages[kind]]
        lines[f"{kind}: median"] = f"{spread(medians, '{:.1f}')} ms (target < {PAGE_TARGET_MEDIAN_MS})"
        lines[f"{kind}: p99"] = f"{spread(tails, '{:.1f}')} ms (target < {PAGE_TARGET_P99_MS})"
    for name, runs in reads.items():
        lines[f"hot read, {name}"] = (f"{spread([r['rps'] for r in runs])} req/s, "
                                      f"p99 {spread([r['p99'] for r in runs], '{:.2f}')} ms")
    for name in ("console on", "console in use"):
        lines[f"{name} / console off"] = spread([r["rps"] / o["rps"] for r, o in zip(
            reads[name], reads["console off"], strict=True)], "{:.1%}")
    common.report(f"console at size ({SEGMENTS:,} segments, {args.users:,} users, {args.history:,} history rows; "
                  f"{args.requests} sequential requests a page kind a round; wrk 32 connections, {args.duration} s; "
                  f"console in use: {args.views:g} page views/s)", lines)


def cli() -> None:
    common.cli(__doc__, main, rounds=3, requests=(200, "requests a page kind a round"),
               users=(1_000_000, "registered users (3 memberships each, skewed over the segments)"),
               history=(5_000_000, "history rows over the last 3 months"),
               duration=(10, "seconds of wrk a hot-read figure"),
               views=(2.0, "console page views a second while the hot read is measured 'in use'"))


if __name__ == "__main__":
    cli()
