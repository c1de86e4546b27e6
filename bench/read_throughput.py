"""GET /users/{id}/segments: this API against a minimal FastAPI + asyncpg baseline, same data,
same database, same load (wrk, random user ids, 32 connections), in one run; and this API with
access control on (every read sends an API key) against the same API open.

    python -m bench.read_throughput [--users 200000] [--duration 15] [--workers 2]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import os
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

from bench import common
from bench.common import bench_environment
from devstack.processes import free_port, stop_process
from shared.api_keys import new_key

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


def wrk(port: int, users: int, duration: int, connections: int, headers: tuple[str, ...] = ()) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.replace("{users}", str(users)))
    # Warm up (connections, prepared statements, caches), then measure.
    extra = [option for header in headers for option in ("-H", header)]
    subprocess.run(["wrk", "-t2", f"-c{connections}", "-d3s", *extra, "-s", script.name, f"http://127.0.0.1:{port}"],
                   capture_output=True, check=True)
    output = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", *extra, "-s",
                             script.name, f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                            check=True).stdout
    os.unlink(script.name)

    def millis(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", output).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50": millis("50%"), "p99": millis("99%"), "errors": int(errors.group(1)) if errors else 0}


async def main(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for this benchmark: apt-get install wrk")
    async with bench_environment("reads") as (_infra, new):
        settings, pool = await new("data")
        await seed(pool, args.users, 100, 10, 5)
        env = {**os.environ, "DATABASE_URL": settings.database_url,
               "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "LOG_LEVEL": "WARNING"}
        key, line = new_key("bench", ["read"])
        keys_file = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "api-keys"
        keys_file.write_text(line + "\n")
        api = [sys.executable, "-m", "services.query_api", "--workers", str(args.workers)]
        # name → (command, extra environment, wrk headers)
        servers = {
            "this API": (api, {}, ()),
            "keys on": (api, {"API_KEYS_FILE": str(keys_file)}, (f"Authorization: Bearer {key}",)),
            "baseline": ([sys.executable, "-m", "uvicorn", "bench.baseline_api:app", "--workers", str(args.workers),
                          "--log-level", "warning", "--no-access-log"], {}, ()),
        }
        # Rounds alternate the two servers, and medians are reported: on a small shared machine
        # single runs differ enough to decide a ratio by luck.
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        for round_number in range(1, args.rounds + 1):
            for name, (command, extra_env, headers) in servers.items():
                port = free_port()
                process = serve([*command, "--port", str(port)], {**env, **extra_env, "API_PORT": str(port)}, port)
                try:
                    print(f"  round {round_number}/{args.rounds}: {name} for {args.duration}s…", file=sys.stderr,
                          flush=True)
                    result = wrk(port, args.users, args.duration, args.connections, headers)
                    rounds[name].append(result)
                    print(f"    {result['rps']:,.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms",
                          file=sys.stderr, flush=True)
                finally:
                    stop_process(process)
        results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                   for name, runs in rounds.items()}
        shutil.rmtree(keys_file.parent)
    ours, base, keyed = results["this API"], results["baseline"], results["keys on"]
    common.report(
        f"reads: GET /users/{{id}}/segments, {args.users:,} users x 5 memberships, 100 segments (10 rollout), "
        f"{args.connections} connections, {args.workers} workers each, wrk on the same machine, "
        f"median of {args.rounds} alternating {args.duration}s rounds", {
            **{name: f"{result['rps']:9,.0f} req/s  p50 {result['p50']:.2f} ms  p99 {result['p99']:.2f} ms"
                     f"  non-2xx {result['errors']}" for name, result in results.items()},
            "ratio": f"{ours['rps'] / base['rps']:9.2f}x   (target >= 2x with p99 <= 25 ms)",
            "keys on / off": f"{keyed['rps'] / ours['rps']:9.1%}   (target >= 95%)",
        })


def cli() -> None:
    common.cli(__doc__, main, users=200_000, duration=10, rounds=3, workers=2, connections=32)


if __name__ == "__main__":
    cli()
