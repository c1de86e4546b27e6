"""The service at the scale of a large marketplace, each figure against its baseline in the same run.

Seeds, with COPY and a progress bar, a database of --users registered users, --memberships
explicit memberships over --segments segments (sizes Zipf-like: a few with millions of members,
most with thousands; 2 × --rounds of them with exactly --deleted members, for the deletions),
--rollout-segments of them with a rollout (the largest among them), and --history rows over the
last 3 months; and a baseline database of 200,000 users made by the same generator, every count
scaled down with the users. Then:

- storage: bytes per membership and per history row, tables plus indexes, against the bare tuple;
- the hot read (wrk, GET /users/{id}/segments, one API process per database): req/s, p99 and
  requests a CPU second at full size as a ratio of the baseline, with uniformly random users
  (a cold working set) and with Zipf-skewed users;
- a percent change from 10 % to 50 % of a segment whose explicit members are 1 % of the users, and
  of the largest segment, on each database: time to its outcome;
- the all-users report of last month, with two rollout changes added to it (the largest segment
  and the percent changes' one, each raised from 0 to 10 % of the users), streamed through the
  API (one process): rows a second against COPY … TO STDOUT of the month's explicit rows, and
  the API's peak RSS;
- with `migrate` among --measures: the full database is made at the schema before
  --migrate-from and seeded, then the migrations from there on are applied to it, timed, while
  a writer inserts and deletes a membership every 50 ms: the longest a write waited (against
  the same writer idle), and the longest any lock that blocks writes was held on a table;
- with `expiry`: --expiring memberships of the full database due within the same minute, removed
  by the expiry worker (its own process, its configured batch and connections) and, in alternate
  rounds, by one DELETE … RETURNING into one INSERT (the limit): rows a second of each; and the
  hot read's p99 at a steady --read-rate (Zipf users) during the worker's drain against the same
  reads for --duration seconds just before it, with the same rows due;
- delete_segment of a segment with --deleted explicit members, in chunks (the default; `delete`)
  and in one transaction (CONSUMER_SEGMENT_REMOVAL_CHUNK=0; `delete-at-once`): time to its
  outcome, the WAL it writes, and the longest wait of the commands sent meanwhile, segment
  commands behind it in its partition and user commands on every partition (record timestamp to
  outcome), against the longest wait of the same commands in the --idle-probes seconds before
  and after it (the machine's own stalls: the broker, PostgreSQL and this process share its
  cores); and the peak lag of the replicas streaming from the server, from the deletion to
  --idle-probes seconds after its outcome (a run on embedded servers starts one, on this machine;
  on a server given by DATABASE_URL, its own replicas are watched).

Every figure is the median and range of --rounds rounds; --measures picks some of them (both
databases are seeded whatever it picks). The full size of the design card:

    python -m bench.scale --users 10000000 --memberships 50000000 --history 30000000 --deleted 2000000 \\
        --expiring 1000000

The defaults are a quick run of a few minutes. Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

from bench import common
from bench.common import bench_environment, spread, start_replica
from bench.read_throughput import serve
from bench.scale.commands import Outcomes, consumer_running, deletion, percent_change
from bench.scale.data import percent_rank, seed, slug, storage
from bench.scale.expiry import expiry
from bench.scale.migrate import migrations
from bench.scale.reads import hot_reads
from bench.scale.report import report_figures, report_month
from devstack.processes import free_port, stop_process
from shared.db import create_pool
from shared.kafka import create_producer

BASELINE_USERS = 200_000
MEASURES = ("migrate", "storage", "reads", "report", "percent", "delete", "delete-at-once", "expiry")


def ratios(figures: list[float], baselines: list[float], form: str) -> str:
    """The median and range of each round's figure over its baseline (rounds paired in order)."""
    return spread([figure / baseline for figure, baseline in zip(figures, baselines, strict=True)], form)


def scaled(args, users: int) -> dict:
    factor = users / args.users
    return {"users": users, "memberships": max(args.segments, round(args.memberships * factor)),
            "segments": args.segments, "rollout_segments": args.rollout_segments,
            "history": round(args.history * factor), "deleted": max(1, round(args.deleted * factor)),
            "rounds": args.rounds}


async def main(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for this benchmark: apt-get install wrk")
    if percent_rank(args.rounds) + 1 > args.segments - args.rollout_segments:
        raise SystemExit("--segments must leave room for the deletion rounds' segments")
    measures = set(args.measures.split(","))
    if not measures or measures - set(MEASURES):
        raise SystemExit(f"--measures: a comma-separated choice of {', '.join(MEASURES)}")
    if args.reuse and "migrate" in measures:
        raise SystemExit("--reuse: `migrate` needs a database seeded at the schema before --migrate-from")
    async with bench_environment("scale") as (infra, new), contextlib.AsyncExitStack() as cleanup:
        if args.reuse:
            full_settings, full_pool = await new("full", database_url=args.reuse)
            made, seeded = await full_pool.fetchval("SELECT count(*) FROM memberships"), None
            if measures & {"delete", "delete-at-once"} and await full_pool.fetchval(
                    "SELECT count(*) FROM segments WHERE slug = ANY($1::text[]) AND deleted_at IS NULL",
                    [slug(rank) for rank in range(1, 1 + 2 * args.rounds)]) < 2 * args.rounds:
                raise SystemExit("--reuse: an earlier run deleted the segments `delete` deletes; seed anew")
        else:
            full_settings, full_pool = await new("full", args.migrate_from if "migrate" in measures else None)
            started = time.monotonic()
            made = await seed(full_settings.database_url, "full size", **scaled(args, args.users))
            seeded = time.monotonic() - started
            print(f"  the full-size database, for --reuse: {full_settings.database_url}", file=sys.stderr, flush=True)
        base_settings, base_pool = await new("base")
        await seed(base_settings.database_url, "baseline", **scaled(args, BASELINE_USERS))
        migrated = await migrations(full_settings, full_pool) if "migrate" in measures else None
        sizes = {name: await storage(pool) for name, pool in (("full", full_pool), ("baseline", base_pool))
                 if "storage" in measures}

        reads: dict[tuple[str, str], list[dict]] = {}
        servers = {}
        try:
            for name, settings in (("full", full_settings), ("baseline", base_settings)):
                port = free_port()
                env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", "API_WORKERS": str(args.workers),
                       "API_PORT": str(port)}
                servers[name] = (serve([sys.executable, "-m", "services.query_api", "--port", str(port)], env, port),
                                 port)
            ports = {name: (port, process.pid) for name, (process, port) in servers.items()}
            for round_number in range(1, args.rounds + 1 if "reads" in measures else 1):
                figures = await hot_reads(ports, {"full": args.users, "baseline": BASELINE_USERS}, args.duration,
                                          round_number)
                for key, value in figures.items():
                    reads.setdefault(key, []).append(value)
                print(f"  hot read round {round_number}/{args.rounds}: " + ", ".join(
                    f"{name} {kind} {value['rps']:,.0f} req/s p99 {value['p99']:.1f} ms"
                    for (name, kind), value in figures.items()), file=sys.stderr, flush=True)
        finally:
            for process, _port in servers.values():
                stop_process(process)

        expired = {}
        if "expiry" in measures:
            port = free_port()
            env = {**os.environ, **full_settings.to_env(), "LOG_LEVEL": "WARNING", "API_WORKERS": str(args.workers),
                   "API_PORT": str(port)}
            api = serve([sys.executable, "-m", "services.query_api", "--port", str(port)], env, port)
            try:
                expired = await expiry(full_settings, full_pool, port, args.users, args)
            finally:
                stop_process(api)

        reports = {}
        if "report" in measures:
            for name, settings, pool in (("full", full_settings, full_pool), ("baseline", base_settings, base_pool)):
                year, month = await report_month(pool, [slug(0), slug(percent_rank(args.rounds))])
                reports[name] = await report_figures(settings, pool, year, month, args.rounds)

        if measures & {"delete", "delete-at-once"} and infra.postgres is not None:
            # The replica's lag is part of a deletion's cost; on a server given by URL, its own replicas'.
            print("  starting a replica of the full-size server", file=sys.stderr, flush=True)
            await start_replica(infra, full_settings, cleanup)
        producer = create_producer(full_settings)
        await producer.start()
        # One transaction of millions of rows outlasts the services' statement timeout (the
        # consumer retries it until it gives up): measured without one, to see its cost.
        untimed_pool = await create_pool(full_settings.database_url, max_size=12, command_timeout=None)
        percent: dict[tuple[str, str], list[float]] = {}
        targets_of_percent = {"explicit members 1% of users": slug(percent_rank(args.rounds)),
                              "the largest segment": slug(0)}
        deletes: dict[str, list[dict]] = {}
        # Each database's consumer publishes to its own results topic: a reader each.
        async with Outcomes(full_settings) as full_outcomes, Outcomes(base_settings) as base_outcomes:
            try:
                for name, settings, pool, outcomes in (("full", full_settings, full_pool, full_outcomes),
                                                       ("baseline", base_settings, base_pool, base_outcomes)):
                    if "percent" not in measures:
                        break
                    async with consumer_running(settings, pool, outcomes, producer):
                        for target, target_slug in targets_of_percent.items():
                            for _ in range(args.rounds):
                                percent.setdefault((target, name), []).append(
                                    await percent_change(settings, outcomes, producer, target_slug))
                            print(f"  percent change on {name}, {target}: " + ", ".join(
                                f"{s:.2f} s" for s in percent[(target, name)]), file=sys.stderr, flush=True)
                variants = {name: settings for name, settings, measure in (
                    ("in chunks", full_settings, "delete"),
                    ("one transaction", full_settings.model_copy(update={"consumer_segment_removal_chunk": 0}),
                     "delete-at-once")) if measure in measures}
                pools = {"in chunks": full_pool, "one transaction": untimed_pool}
                targets = iter(slug(rank) for rank in range(1, 1 + 2 * args.rounds))
                # Small segments without a rollout.
                probe_slugs = (slug(args.segments - args.rollout_segments),
                               slug(args.segments - args.rollout_segments - 1))
                for round_number in range(1, args.rounds + 1 if variants else 1):
                    order = list(variants) if round_number % 2 else list(variants)[::-1]
                    for name in order:
                        async with consumer_running(variants[name], pools[name], full_outcomes, producer):
                            deletes.setdefault(name, []).append(await deletion(
                                variants[name], pools[name], full_outcomes, producer, next(targets), args.users,
                                probe_slugs, args.idle_probes))
                        print(f"  delete round {round_number}/{args.rounds}, {name}: " + ", ".join(
                            f"{key} {value:,.2f}" for key, value in deletes[name][-1].items()),
                            file=sys.stderr, flush=True)
            finally:
                await producer.stop()
                await untimed_pool.close()

    lines = {"seeded": f"{made:,} memberships, {args.history:,} history rows, {args.users:,} users " + (
        f"in {seeded / 60:.1f} min (COPY)" if seeded is not None else "(reused, seeded by an earlier run)")}
    if migrated:
        lines[f"migrations {migrated['applied'][0]} to {migrated['applied'][-1]}"] = (
            f"{migrated['seconds']:.1f} s; longest write meanwhile {migrated['longest write']:.2f} s (idle "
            f"{migrated['idle write']:.2f} s; target < 1 s); longest lock blocking writes: {migrated['lock']}")
    for table, label in (("memberships", "membership"), ("membership_history", "history row")) if sizes else ():
        total, heap, bare = sizes["full"][table]
        lines[f"storage a {label}"] = (f"{total:.0f} bytes with indexes, {heap:.0f} table only, bare tuple {bare:.0f} "
                                       f"({total / bare:.1f}x); baseline {sizes['baseline'][table][0]:.0f} bytes")
    for kind in ("uniform", "zipf") if reads else ():
        full, base = reads[("full", kind)], reads[("baseline", kind)]
        lines[f"hot read, {kind} users"] = (
            f"{spread([r['rps'] for r in full])} req/s, p99 {spread([r['p99'] for r in full], '{:.1f}')} ms, "
            f"{spread([1e6 / r['cpu_us'] for r in full])} requests a CPU second")
        lines[f"hot read, {kind}: full / baseline"] = (
            f"{ratios([f['rps'] for f in full], [b['rps'] for b in base], '{:.1%}')} of the rate "
            f"(target >= 80%), p99 {ratios([f['p99'] for f in full], [b['p99'] for b in base], '{:.2f}')}x")
    if expired:
        lines[f"expiry of {args.expiring:,} due in one minute"] = (
            f"worker {spread(expired['worker'])} rows/s, limit {spread(expired['limit'])} rows/s, ratio "
            f"{ratios(expired['worker'], expired['limit'], '{:.0%}')} "
            f"(target >= 50%); read p99 at {args.read_rate} reads/s draining {spread(expired['during'], '{:.1f}')} "
            f"ms, idle {spread(expired['idle'], '{:.1f}')} ms, "
            f"{ratios(expired['during'], expired['idle'], '{:.2f}')}x "
            f"(target < 2x)")
    for name, figures in reports.items():
        lines[f"all-users month report, {name}"] = (
            f"{figures['rows']:,} rows ({figures['explicit']:,} explicit, the rest from 2 rollout changes): "
            f"{spread(figures['api'])} rows/s, COPY {spread(figures['copy'])} rows/s, ratio "
            f"{ratios(figures['api'], figures['copy'], '{:.0%}')} "
            f"(target >= 50%), API peak RSS {spread(figures['peak'])} MB (target < 150 MB)")
    for target in targets_of_percent if percent else ():
        lines[f"percent change 10% -> 50%, {target}"] = (
            f"{spread(percent[(target, 'full')], '{:.3f}')} s at full size, "
            f"{spread(percent[(target, 'baseline')], '{:.3f}')} s at {BASELINE_USERS:,} users (target < 1 s)")
    for name, runs in deletes.items():
        lines[f"delete_segment of {args.deleted:,}, {name}"] = (
            f"outcome {spread([r['seconds'] for r in runs], '{:.1f}')} s, WAL "
            f"{spread([r['wal_mb'] for r in runs])} MiB; longest wait: segment commands behind it "
            f"{spread([r['segment wait'] for r in runs], '{:.2f}')} s (without a deletion "
            f"{spread([r['segment wait idle'] for r in runs], '{:.2f}')} s), user commands "
            f"{spread([r['user wait'] for r in runs], '{:.2f}')} s (without "
            f"{spread([r['user wait idle'] for r in runs], '{:.2f}')} s) (target: < 1 s behind it); peak replica "
            "lag " + (f"{spread([r['replica lag s'] for r in runs], '{:.2f}')} s, "
                      f"{spread([r['replica lag MiB'] for r in runs])} MiB of WAL behind"
                      if all("replica lag s" in r for r in runs) else "not measured (no replica streaming)"))
    common.report(f"at scale ({args.users:,} users, {made:,} memberships over {args.segments:,} segments, "
                  f"{args.rollout_segments} with a rollout, {args.history:,} history rows; baseline "
                  f"{BASELINE_USERS:,} users; wrk 32 connections, {args.duration} s)", lines)


def cli() -> None:
    common.cli(__doc__, main, rounds=3,
               users=(1_000_000, "registered users (full size: 10,000,000)"),
               memberships=(5_000_000, "explicit memberships (full size: 50,000,000)"),
               segments=(1_000, "segments"), rollout_segments=(100, "segments with a rollout"),
               history=(3_000_000, "history rows over the last 3 months (full size: 30,000,000)"),
               deleted=(200_000, "explicit members of each deleted segment (full size: 2,000,000)"),
               duration=(10, "seconds of wrk a hot-read figure, and of the idle reads with `expiry`"),
               workers=(2, "API worker processes"),
               expiring=(100_000, "memberships due in the same minute, with `expiry` (full size: 1,000,000)"),
               read_rate=(200, "reads a second timed during the expiry rounds"),
               reuse=("", "the URL of a full-size database an earlier run seeded (printed by it): measured "
                          "again without seeding (not `migrate`; `delete` only while its segments are left)"),
               idle_probes=(30, "seconds of the deletion rounds' commands sent before each deletion, and after"),
               measures=(",".join(MEASURES), f"which figures, comma-separated, of: {', '.join(MEASURES)}"),
               migrate_from=("0010_segment_member_counts",
                             "with `migrate`: the first migration applied while measured"))


if __name__ == "__main__":
    cli()
