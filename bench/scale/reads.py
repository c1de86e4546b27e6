"""The hot read: wrk at full speed, and paced reads timed one by one."""

from __future__ import annotations

import asyncio
import math
import random
import time

import aiohttp

from bench import common
from bench.common import percentile
from bench.read_throughput import wrk

# Users drawn by wrk: uniformly, or log-uniformly (user ⌊N^u⌋: the lower ids far more often, a
# hot set as real traffic has).
ZIPF_LUA = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/users/" .. math.floor({users} ^ math.random()) .. "/segments")
end
"""


async def hot_reads(ports: dict[str, tuple[int, int]], users: dict[str, int], duration: int,
                    round_number: int) -> dict[tuple[str, str], dict]:
    """Each database with uniform and Zipf users, in turn first and last from round to round."""
    runs = [(name, kind) for name in ports for kind in ("uniform", "zipf")]
    figures = {}
    for name, kind in runs if round_number % 2 else runs[::-1]:
        port, pid = ports[name]
        figures[(name, kind)] = await asyncio.to_thread(
            wrk, port, users[name], duration, 32, (), pid, 3, ZIPF_LUA if kind == "zipf" else None)
    return figures


async def read_latencies(port: int, users: int, rate: int, stop: asyncio.Event, timing: asyncio.Event) -> list[float]:
    """GET /users/{id}/segments at a steady `rate` a second, users Zipf-skewed as ZIPF_LUA draws
    them, until `stop`: the seconds of each read started once `timing` was set. Each read starts
    on its turn whether or not the ones before it have answered, so a stall shows in every read
    it delays."""
    rng = random.Random(11)
    latencies: list[float] = []
    running: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async def read(user: int) -> None:
            started, timed = time.monotonic(), timing.is_set()
            async with session.get(f"/users/{user}/segments") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET /users/{user}/segments answered {response.status}")
            if timed:
                latencies.append(time.monotonic() - started)

        async for _ in common.paced(rate):
            if stop.is_set():
                break
            task = asyncio.create_task(read(math.floor(users ** rng.random())))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
    return latencies


async def reads_p99(port: int, users: int, rate: int, work, timing: asyncio.Event | None = None
                    ) -> tuple[float, object]:
    """The reads' p99 in milliseconds while `work` (awaited) runs, of the reads started once
    `timing` is set (all of them without it), and what `work` returned."""
    stop = asyncio.Event()
    if timing is None:
        timing = asyncio.Event()
        timing.set()
    reads = asyncio.create_task(read_latencies(port, users, rate, stop, timing))
    try:
        result = await work
    finally:
        stop.set()
    return percentile(await reads, 0.99) * 1000, result
