"""GET /users/{id}/segments: CPU instructions the API spends on one read, with tracing off and on,
counted by valgrind's callgrind rather than timed.

Reads/s on this machine move 10-35 % from one round to the next (bench.read_throughput prints an
A/A control to show it), more than the few percent tracing is allowed to cost. An instruction
count does not move: the same server, requests and data give the same count within a fraction of
a percent, whatever else the machine is doing. Each round starts the API (one worker, under
callgrind, counting switched off until it serves), warms it up, then counts its serving thread
over N sequential requests and over the 2N after them; the difference over N is what one more
read costs, the start, the warm-up and the per-window work cancelled out. The reads are the same
in every variant (the same user ids, in order), one at a time, so each is a query of its own:
nothing is shared between reads as under load, the strictest case for a per-read cost.

    python -m bench.read_instructions [--requests 1000] [--rounds 3]

Needs valgrind (Debian: apt-get install valgrind). A round takes about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common
from bench.common import Progress, bench_environment, spread
from bench.read_throughput import UNSAMPLED, seed, serve
from devstack.otlp_sink import OtlpSink
from devstack.processes import free_port, stop_process

USERS = 50_000


def read_sequentially(port: int, user_ids: list[int], headers: str = "") -> None:
    """One keep-alive connection, one GET at a time, each answered 200 before the next."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
        for user_id in user_ids:
            connection.sendall(f"GET /users/{user_id}/segments HTTP/1.1\r\nHost: bench\r\n{headers}\r\n".encode())
            received = b""
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    raise RuntimeError("the API closed the connection")
                received += chunk
                head, separator, body = received.partition(b"\r\n\r\n")
                if separator:
                    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
                    if len(body) >= length:
                        break
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET /users/{user_id}/segments: {head.splitlines()[0].decode()}")


def serving_thread_total(dump: Path) -> int:
    """Instructions of the thread the event loop runs in (callgrind's thread 1, the main one)."""
    match = re.search(r"^totals: (\d+)", dump.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(match.group(1))


def count_reads(env: dict, requests: int, headers: str, workdir: Path) -> float:
    """Instructions of one more read for a server started with `env` (see the module's doc)."""
    port = free_port()
    out = workdir / "callgrind.out"
    process = serve(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                     f"--callgrind-out-file={out}", sys.executable, "-m", "services.query_api", "--workers", "1",
                     "--port", str(port)], {**env, "API_PORT": str(port)}, port, path="/readyz")

    def callgrind(*options: str) -> None:
        subprocess.run(["callgrind_control", *options, str(process.pid)], check=True, capture_output=True)

    try:
        ids = random.Random(7)
        read_sequentially(port, [ids.randint(1, USERS) for _ in range(300)], headers)  # warm-up, not counted
        user_ids = [ids.randint(1, USERS) for _ in range(3 * requests)]
        callgrind("-i", "on")
        read_sequentially(port, user_ids[:requests], headers)
        callgrind("-d")  # dumps and zeroes
        read_sequentially(port, user_ids[requests:], headers)
        callgrind("-d")
        callgrind("-i", "off")
        first, second = (serving_thread_total(Path(f"{out}.{dump}-01")) for dump in (1, 2))
    finally:
        stop_process(process, timeout=60)
    return (second - first) / requests


async def main(args) -> None:
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("valgrind is needed for this benchmark: apt-get install valgrind")
    async with bench_environment("instructions") as (_infra, new), contextlib.AsyncExitStack() as cleanup:
        settings, pool = await new("data")
        await seed(pool, USERS, 100, 10, 5)
        sink = cleanup.enter_context(OtlpSink())
        env = {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING"}
        traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
        callers = f"traceparent: {UNSAMPLED}\r\n"  # callers that trace too, and sampled these reads out
        variants = {  # name → (extra environment, request headers)
            "tracing off": ({}, ""),
            "tracing 1%": ({**traced, "OTEL_TRACES_SAMPLER_ARG": "0.01"}, ""),
            "tracing 100%": ({**traced, "OTEL_TRACES_SAMPLER_ARG": "1.0"}, ""),
            "tracing off, callers' context": ({}, callers),  # the same requests, header included
            "tracing 1%, callers' context": ({**traced, "OTEL_TRACES_SAMPLER_ARG": "0.01"}, callers),
        }
        wanted = set(args.variants.split(",")) | {"tracing off"} if args.variants else set(variants)
        variants = {name: variant for name, variant in variants.items() if name in wanted}
        counts: dict[str, list[float]] = {name: [] for name in variants}
        progress = Progress("servers counted", args.rounds * len(variants))
        with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as workdir:
            for _ in range(args.rounds):
                for name, (extra, headers) in variants.items():
                    counts[name].append(await asyncio.to_thread(
                        count_reads, {**env, **extra}, args.requests, headers, Path(workdir)))
                    progress.update(sum(map(len, counts.values())))
    lines = {name: f"{spread(values, '{:,.0f}')} instructions a read" for name, values in counts.items()}
    compared = {  # variant → (its baseline, what the ratio is held to)
        "tracing 1%": ("tracing off", "target <= 103%"),
        "tracing 100%": ("tracing off", "every read traced: the cost as it is"),
        "tracing 1%, callers' context": ("tracing off, callers' context", "target <= 103%"),
    }
    for name, (baseline, target) in compared.items():
        if name in counts and baseline in counts:
            ratios = [value / base for value, base in zip(counts[name], counts[baseline], strict=True)]
            lines[f"{name} / {baseline}"] = f"{spread(ratios, '{:.1%}')}   ({target})"
    common.report(f"instructions a read: GET /users/{{id}}/segments, one worker under callgrind, {args.requests:,} "
                  f"then {2 * args.requests:,} sequential reads a round, {USERS:,} users x 5 memberships", lines)


def cli() -> None:
    common.cli(__doc__, main, requests=1000, rounds=3,
               variants=("", "only these variants besides 'tracing off', comma-separated (e.g. 'tracing 1%'); "
                             "all when empty"))


if __name__ == "__main__":
    cli()
