"""Command consumer: how soon commands are applied again after a consumer process is SIGKILLed,
for each way of owning partitions, in rotating rounds.

- dynamic group membership: the broker keeps a killed member's partitions until its session
  times out, then rebalances them to the restarted process;
- static group membership (CONSUMER_GROUP_INSTANCE_ID): the restarted process rejoins as the same
  member; on Apache Kafka without a rebalance, on the embedded broker after its join and sync;
- partition leases (CONSUMER_PARTITION_OWNERSHIP=lease): the killed process's database session
  ends with it, and with it its advisory locks; the restarted process takes them at once;
- partition leases with a standby: a second process already running takes over (time from the
  kill, no restart at all), and the killed one is started again as the next standby.

Timed from the restart (from the kill, for the standby) to the first command applied again.

    python -m bench.consumer_recovery [--kills 3] [--rounds 3] [--rate 200]
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import orjson
from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import bench_environment, spread
from bench.consumer_workload import seed_segments
from devstack.processes import stop_process
from shared.kafka import kafka_options

KINDS = {  # label: (environment of the consumer processes, whether a standby runs)
    "dynamic membership": ({}, False),
    "static membership": ({"CONSUMER_GROUP_INSTANCE_ID": "bench-consumer"}, False),
    "partition leases": ({"CONSUMER_PARTITION_OWNERSHIP": "lease"}, False),
    "partition leases, standby": ({"CONSUMER_PARTITION_OWNERSHIP": "lease"}, True),
}


def start_consumer(settings, overrides: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "CONSUMER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
    for name in ("CONSUMER_GROUP_INSTANCE_ID", "CONSUMER_PARTITION_OWNERSHIP"):
        env.pop(name, None)
    env.update(overrides)
    return subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def produce_steadily(settings, rate: int, stopping: asyncio.Event) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=5, acks="all")
    await producer.start()
    rng, index = random.Random(4), 0
    try:
        while not stopping.is_set():
            for _ in range(max(1, rate // 20)):
                user = rng.randint(1, 100_000)
                await producer.send(settings.assignments_commands_topic, orjson.dumps(
                    {"type": "update_user_segments", "command_id": f"r-{index}", "user_id": user,
                     "add": [f"SEGMENT_{rng.randrange(50)}"]}), key=str(user).encode())
                index += 1
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()


async def applied(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM command_outcomes")


async def until_applying(pool, since: int, deadline: float) -> None:
    while await applied(pool) <= since:
        if time.monotonic() > deadline:
            raise RuntimeError("the consumer applied nothing within 120 s")
        await asyncio.sleep(0.02)


async def leased_by(pool) -> int | None:
    """The backend holding the partition leases in the benchmark's database, if any."""
    return await pool.fetchval(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1""")


async def rounds(settings, pool, kind: str, kills: int, label: str) -> list[float]:
    """Start the consumer (and a standby), then `kills` times: SIGKILL the one applying once it
    applies, start a process again at once, and time to the first command applied again."""
    overrides, standby = KINDS[kind]
    active, waiting = start_consumer(settings, overrides), None
    times = []
    try:
        await until_applying(pool, await applied(pool), time.monotonic() + 120)
        if standby:
            waiting = start_consumer(settings, overrides)
        for kill in range(1, kills + 1):
            await asyncio.sleep(2)  # settled, applying as usual (and the standby waiting)
            if standby:
                holder = await leased_by(pool)
                if not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                           "'segmentation command consumer leases' AND pid <> $1", holder):
                    raise RuntimeError("the standby has no lease session")
            active.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            active.wait()
            before = await applied(pool)
            if standby:  # the standby applies next; the restarted process is the next standby
                active, waiting = waiting, start_consumer(settings, overrides)
                started = killed
            else:
                active = start_consumer(settings, overrides)
                started = time.monotonic()
            await until_applying(pool, before, started + 120)
            times.append(time.monotonic() - started)
            print(f"  {label}, kill {kill}/{kills}: applying again {times[-1]:.2f} s after the "
                  f"{'kill' if standby else 'restart'}", file=sys.stderr, flush=True)
    finally:
        await asyncio.to_thread(stop_process, active)
        await asyncio.to_thread(stop_process, waiting)
    return times


async def main(args) -> None:
    async with bench_environment("recovery") as (_infra, new):
        results: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for round_number in range(1, args.rounds + 1):
            order = list(KINDS)
            order = order[round_number % len(order):] + order[:round_number % len(order)]
            for kind in order:
                settings, pool = await new(f"{kind.split()[0]}_{len(results[kind])}_{round_number}".replace(",", ""))
                await seed_segments(pool, 50)
                stopping = asyncio.Event()
                producing = asyncio.create_task(produce_steadily(settings, args.rate, stopping))
                try:
                    results[kind] += await rounds(settings, pool, kind, args.kills,
                                                  f"round {round_number}/{args.rounds}, {kind}")
                finally:
                    stopping.set()
                    await producing
        session = settings.consumer_session_timeout_ms / 1000
    notes = {"dynamic membership": "the baseline: waits out the session timeout",
             "static membership": "target <= 5 s",
             "partition leases": "target <= 5 s",
             "partition leases, standby": "from the kill; no restart needed"}
    common.report(
        f"consumer recovery after SIGKILL (restart → first command applied; {args.rate} commands/s arriving, "
        f"session timeout {session:.0f} s)",
        {kind: f"{spread(times, '{:.2f}', f'kills over {args.rounds} rounds')} s   ({notes[kind]})"
         for kind, times in results.items()})


def cli() -> None:
    common.cli(__doc__, main, kills=(3, "kills in each round"), rounds=(3, "rounds of each kind, rotating their order"),
               rate=(200, "commands produced a second meanwhile"))


if __name__ == "__main__":
    cli()
