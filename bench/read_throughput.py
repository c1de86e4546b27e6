"""GET /users/{id}/segments: this API against a minimal FastAPI + asyncpg baseline, same data,
same database, same load (wrk, random user ids, 32 connections), in one run; and this API with
access control on (every read sends an API key), with tracing on (1 % and 100 % of requests
sampled, spans sent over OTLP to a receiver in this process), and reading from a streaming replica
(with and without a consistency token), each against the same API as it is by default.

    python -m bench.read_throughput [--users 200000] [--duration 15] [--workers 2]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import psutil

from bench import common
from bench.common import Progress, bench_environment, spread, start_replica
from devstack.otlp_sink import OtlpSink
from devstack.processes import free_port, stop_process
from shared.api_keys import new_key
from shared.rollout import rollout_bucket

UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"  # W3C trace context, not sampled
LUA = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/users/" .. math.random(1, {users}) .. "/segments")
end
"""


async def seed(pool, users: int, segments: int, rollout_segments: int, per_user: int) -> None:
    print(f"  seeding {users:,} users x {per_user} memberships, {segments} segments "
          f"({rollout_segments} with a rollout)…", file=sys.stderr, flush=True)
    await pool.execute(
        """INSERT INTO segments (slug, percent, created_at, updated_at)
           SELECT 'SEGMENT_' || g, CASE WHEN g < $2 THEN 5 + g * 5 ELSE 0 END, now(), now()
           FROM generate_series(0, $1 - 1) AS g""", segments, rollout_segments)
    await pool.execute("INSERT INTO users SELECT g, now() FROM generate_series(1, $1) AS g", users)
    await pool.execute(
        """INSERT INTO memberships (user_id, segment_id, added_at, expires_at)
           SELECT u, (SELECT min(id) FROM segments) + $3 + (u * 7 + k * 13) % ($2 - $3), now(),
                  CASE WHEN k = 0 THEN now() + interval '30 days' END
           FROM generate_series(1, $1) AS u, generate_series(0, $4 - 1) AS k
           ON CONFLICT DO NOTHING""", users, segments, rollout_segments, per_user)
    await pool.execute("VACUUM ANALYZE")
    # Write the seeded pages out now: otherwise the checkpoint that follows a bulk load flushes
    # them during the measured rounds, competing for the same two cores.
    await pool.execute("CHECKPOINT")


def serve(command: list[str], env: dict, port: int, path: str = "/users/1/segments") -> subprocess.Popen:
    """Start a server and wait until `path` answers (any status: a key may be needed)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return process
        except urllib.error.HTTPError:
            return process  # it answers
        except OSError:
            time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"{command} did not serve on port {port}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants (a server and its workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def wrk(port: int, users: int, duration: int, connections: int, headers: tuple[str, ...] = (),
        server_pid: int | None = None, warmup: int = 3, lua: str | None = None) -> dict:
    """wrk's figures for GET /users/{id}/segments, users 1 … `users` drawn by `lua` (uniformly by
    default: a script with `{users}` in it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write((lua or LUA).replace("{users}", str(users)))
    # Warm up (connections, prepared statements, caches), then measure.
    extra = [option for header in headers for option in ("-H", header)]
    subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{warmup}s", *extra, "-s", script.name, f"http://127.0.0.1:{port}"],
                   capture_output=True, check=True)
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    output = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", *extra, "-s",
                             script.name, f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                            check=True).stdout
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    os.unlink(script.name)

    def millis(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", output).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50": millis("50%"), "p99": millis("99%"), "errors": int(errors.group(1)) if errors else 0,
            "cpu_us": cpu / requests * 1e6 if requests else 0.0}


async def main(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for this benchmark: apt-get install wrk")
    async with bench_environment("reads") as (infra, new), contextlib.AsyncExitStack() as cleanup:
        settings, pool = await new("data")
        await seed(pool, args.users, 100, 10, 5)
        env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING"}
        key, line = new_key("bench", ["read"])
        keys_file = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "api-keys"
        keys_file.write_text(line + "\n")
        cleanup.callback(shutil.rmtree, keys_file.parent)
        api = [sys.executable, "-m", "services.query_api", "--workers", str(args.workers)]
        # name → (command, extra environment, wrk headers)
        servers = {
            "this API": (api, {}, ()),
            "keys on": (api, {"API_KEYS_FILE": str(keys_file)}, (f"Authorization: Bearer {key}",)),
            "console off": (api, {"UI_ENABLED": "false"}, ()),  # "this API" serves the console (development)
            # The same server again: how far apart two identical servers measure (an A/A control),
            # the resolution every other ratio here is read against.
            "this API again": (api, {}, ()),
            "baseline": ([sys.executable, "-m", "uvicorn", "bench.baseline_api:app", "--workers", str(args.workers),
                          "--log-level", "warning", "--no-access-log"], {}, ()),
        }
        sink = cleanup.enter_context(OtlpSink())  # where traced rounds send their spans
        for label, ratio, headers in (("tracing 1%", "0.01", ()),
                                      # callers that trace too, and sampled this request out
                                      ("tracing 1% callers", "0.01", (f"traceparent: {UNSAMPLED}",)),
                                      ("tracing 100%", "1.0", ())):
            servers[label] = (api, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_TRACES_SAMPLER_ARG": ratio,
                                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, headers)
        # The same without asyncpg's instrumentation: the hot read's query runs past it already
        # (LookupConnection), so this shows that its wrappers cost the hot read nothing.
        servers["tracing 1% no asyncpg"] = (api, {**servers["tracing 1%"][1],
                                                  "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "asyncpg"}, ())
        replica_url = await start_replica(infra, settings, cleanup) if infra.postgres else None
        if replica_url:
            token = await pool.fetchval("SELECT pg_current_wal_lsn()::text")  # replayed before the rounds
            on_replica = {"READ_DATABASE_URLS": replica_url, "MAX_REPLICA_LAG_MS": "60000"}
            servers["replica"] = (api, on_replica, ())
            servers["replica+token"] = (api, on_replica, (f"X-Consistency-Token: {token}",))
        wanted = set(args.variants.split(",")) if args.variants else set(servers)
        servers = {name: server for name, server in servers.items() if name in wanted | {"this API"}}
        # Rounds alternate the servers, each round starting one server later than the one before
        # (no server always runs first), and medians are reported: on a small shared machine single
        # runs differ enough to decide a ratio by luck.
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        order = list(servers)
        for round_number in range(1, args.rounds + 1):
            shift = (round_number - 1) % len(order)
            turn = order[shift:] + order[:shift]
            batches = [turn] if args.at_once else [[name] for name in turn]
            for names in batches:
                print(f"  round {round_number}/{args.rounds}: {' and '.join(names)} for {args.duration}s…",
                      file=sys.stderr, flush=True)
                results = await measure_together({name: servers[name] for name in names}, env, args)
                for name, result in results.items():
                    rounds[name].append(result)
                    print(f"    {name}: {result['rps']:,.0f} req/s, p50 {result['p50']:.2f} ms, "
                          f"p99 {result['p99']:.2f} ms, server CPU {result['cpu_us']:.0f} µs a request",
                          file=sys.stderr, flush=True)
        results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                   for name, runs in rounds.items()}
        missed, checked = (await read_your_writes(settings, env, args.ryw_commands, args.workers)
                           if args.ryw_commands else (0, 0))
    lines = {name: f"{result['rps']:9,.0f} req/s  p50 {result['p50']:.2f} ms  p99 {result['p99']:.2f} ms"
                   f"  non-2xx {result['errors']}  server CPU {result['cpu_us']:.0f} µs a request"
                   f"   (req/s of the rounds: {spread([r['rps'] for r in rounds[name]])})"
             for name, result in results.items()}

    def ratio(name: str, against: str, target: str, form: str = "{:.1%}") -> None:
        """The ratio of each round's pair (alternating rounds: a pair shares the machine's moment),
        and of the server CPU each request took (less disturbed by the load generator and the
        database sharing the cores)."""
        if name in rounds and against in rounds:
            pairs = [run["rps"] / base["rps"] for run, base in zip(rounds[name], rounds[against], strict=True)]
            lines[f"{name} / {against}"] = f"{spread(pairs, form)}   ({target})"
            cpu = [base["cpu_us"] / run["cpu_us"] for run, base in zip(rounds[name], rounds[against], strict=True)
                   if run["cpu_us"]]
            if cpu:
                lines[f"{name} / {against}, requests a CPU second"] = spread(cpu, form)

    ratio("this API", "baseline", "target >= 2x with p99 <= 25 ms", "{:.2f}x")
    ratio("this API again", "this API", "the same server twice: the benchmark's own spread")
    ratio("keys on", "this API", "target >= 95%")
    ratio("this API", "console off", "the web console served beside the hot read; target >= 97%")
    ratio("tracing 1%", "this API", "target >= 97%")
    ratio("tracing 1% callers", "this API", "target >= 97%; callers send unsampled trace context")
    ratio("tracing 1% no asyncpg", "this API", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=asyncpg")
    ratio("tracing 100%", "this API", "every request traced")
    ratio("replica", "this API", "target >= 90%; one machine: the replica shares the cores, so no gain can show")
    ratio("replica+token", "replica", "target >= 100%")
    if checked:
        lines["read-your-writes"] = (f"{missed} of {checked} reads missed a change applied before them "
                                     f"({args.workers} API workers; target 0)")
    common.report(
        f"reads: GET /users/{{id}}/segments, {args.users:,} users x 5 memberships, 100 segments (10 rollout), "
        f"{args.connections} connections, {args.workers} workers each, wrk on the same machine, "
        f"median of {args.rounds} {'simultaneous' if args.at_once else 'alternating'} {args.duration}s rounds", lines)


async def read_your_writes(settings, env: dict, commands: int, workers: int) -> tuple[int, int]:
    """Commands of every kind through POST /commands, each awaited through GET /commands/{id},
    then a read that must reflect it; returns (reads that did not, reads)."""
    consumer = subprocess.Popen([sys.executable, "-m", "services.command_consumer"],  # noqa: ASYNC220 - started once
                                env={**env, "CONSUMER_METRICS_PORT": "0"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    port = free_port()
    api = serve([sys.executable, "-m", "services.query_api", "--workers", str(workers), "--port", str(port)],
                {**env, "API_PORT": str(port)}, port, path="/readyz")
    rng = random.Random(7)
    missed = checked = 0
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            slugs = [f"RYW_{i}" for i in range(5)]
            for slug in slugs:
                await applied(http, {"type": "create_segment", "slug": slug, "command_id": f"ryw-{slug}"})
            progress = Progress("read-your-writes", commands)
            for step in range(commands):
                slug = rng.choice(slugs)
                kind = rng.choice(["percent", "add", "remove"])
                if kind == "percent":
                    percent = rng.choice([0, 10, 50, 90, 100])
                    user = 10_000_000 + rng.randint(1, 1000)  # never named by a command: the rollout alone decides
                    command = {"type": "update_segment", "slug": slug, "percent": percent}
                    expected = rollout_bucket(slug, user) < percent * 100
                else:
                    user = 9_000_000 + rng.randint(1, 50)
                    command = {"type": "update_user_segments", "user_id": user,
                               ("add" if kind == "add" else "remove"): [slug]}
                    expected = kind == "add"  # removed: out (excluded, if a percent covers it)
                await applied(http, {**command, "command_id": f"ryw-{step}"})
                segments = (await http.get(f"/users/{user}/segments")).json()["segments"]
                present = slug in [segment["slug"] for segment in segments]
                checked += 1
                missed += present != expected
                progress.update(step + 1)
    finally:
        stop_process(api)
        stop_process(consumer)
    return missed, checked


async def measure_together(servers: dict[str, tuple], env: dict, args) -> dict[str, dict]:
    """Each server started, then loaded by a wrk of its own, all at the same time, sharing the
    connections: alone, a server has the machine to itself; together (--at-once 1), the servers
    share its moment, each getting the CPU time a process gets, so the ratio of their reads/s is
    the inverse of their cost a request, undisturbed by what the machine does from one round to
    the next."""
    processes = {}
    try:
        for name, (command, extra_env, _headers) in servers.items():
            port = free_port()
            processes[name] = port, serve([*command, "--port", str(port)], {**env, **extra_env, "API_PORT": str(port)},
                                          port, path="/readyz")
        connections = max(1, args.connections // len(servers))
        results = await asyncio.gather(*(
            asyncio.to_thread(wrk, port, args.users, args.duration, connections, servers[name][2], process.pid,
                              args.warmup)
            for name, (port, process) in processes.items()))
        return dict(zip(processes, results, strict=True))
    finally:
        for _port, process in processes.values():
            stop_process(process)


async def applied(http: httpx.AsyncClient, command: dict) -> None:
    assert (await http.post("/commands", json=command)).status_code == 202
    async with asyncio.timeout(30):
        while (response := await http.get(f"/commands/{command['command_id']}")).status_code == 404:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    assert response.json()["status"] == "applied", response.text


def cli() -> None:
    common.cli(__doc__, main, users=200_000, duration=10, rounds=3, workers=2, connections=32,
               warmup=(3, "seconds of load before each measured round (not measured)"),
               ryw_commands=(300, "commands of the read-your-writes check (0: skip it)"),
               variants=("", "only these variants besides 'this API', comma-separated (e.g. 'tracing 1%,baseline'); "
                             "all when empty"),
               at_once=(0, "1: load every server of a round at the same time, each with its share of the connections "
                           "(for a ratio of costs a request, see measure_together); 0: one after the other"))


if __name__ == "__main__":
    cli()
