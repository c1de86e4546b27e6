"""The membership-changes stream under faults: 20,000 commands and thousands of TTL expiries while
the command consumer, the expiry worker and the change publisher are SIGKILLed again and again and
PostgreSQL crashes once. Afterwards the topic equals the history: every history row and every
rollout event is exactly one event id with its fields, no event exists without its row, and each
membership's and each user's own changes are in commit order (tests/change_stream.py)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.change_stream import problems
from tests.contract_model import CommandMaker, ContractModel
from tests.integration.test_chaos import wait_stored
from tests.support import Publisher, read_topic, service_env

pytestmark = pytest.mark.integration

SEED = 20261207
ROUNDS = 20
SEGMENT_COMMANDS_PER_ROUND = 10
USER_COMMANDS_PER_ROUND = 990  # 20 × 1,000 = 20,000 commands
SHORT_TTL = 0.7  # share of additions given a TTL of seconds, so that the expiry worker is busy throughout


class Processes:
    """The three writers and the publisher as processes, as they run in production."""

    MODULES = {"consumer": "services.command_consumer", "expiry": "services.expiry_worker",
               "publisher": "services.change_publisher"}

    def __init__(self, settings, log_dir) -> None:
        self.env = service_env(settings, CONSUMER_MAX_BATCH="100", DB_RETRY_ATTEMPTS="100",
                               DB_RETRY_MAX_BACKOFF_SECONDS="0.5", EXPIRY_BATCH_SIZE="200",
                               EXPIRY_MAX_SLEEP_SECONDS="0.2", PUBLISHER_BATCH_SIZE="300",
                               PUBLISHER_STANDBY_RETRY_SECONDS="0.2")
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []

    def start(self, name: str) -> None:
        log = open(self.log_dir / f"{name}-{len(self.started)}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", self.MODULES[name]], env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        log.close()
        self.running[name] = process
        self.started.append(process)

    def kill(self, name: str) -> None:
        self.running[name].send_signal(signal.SIGKILL)
        self.running[name].wait()
        self.start(name)

    def stop_all(self) -> dict[str, int]:
        """Every process stopped; the exit status of the last of each kind (SIGTERM: 0 expected)."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return {name: process.returncode for name, process in self.running.items()}


def with_short_ttls(command: dict, rng: random.Random) -> dict:
    if command.get("add") and rng.random() < SHORT_TTL:
        command.pop("expires_at", None)
        command["ttl_seconds"] = rng.randint(1, 6)
    return command


async def settled(pool, timeout: float = 180) -> None:
    """Until nothing is left to expire and the outbox is empty."""
    deadline = time.monotonic() + timeout
    query = """SELECT (SELECT count(*) FROM memberships WHERE expires_at IS NOT NULL
                                                        AND expires_at < now() + interval '10 seconds')
                    + (SELECT count(*) FROM membership_changes_outbox)"""
    while (left := await pool.fetchval(query)) > 0:
        assert time.monotonic() < deadline, f"{left} expiries or unpublished changes left after {timeout}s"
        await asyncio.sleep(0.25)


async def test_kills_and_a_database_crash_lose_and_invent_no_change(infra, settings, pool, tmp_path):
    if infra.postgres is None:
        pytest.skip("restarts the embedded PostgreSQL the test session owns")
    rng = random.Random(SEED)
    model = ContractModel()  # only to keep the commands meaningful (segments that exist)
    maker = CommandMaker(rng, [f"SEG_{i}" for i in range(10)], users=1500)
    kills = {round_: rng.choice(list(Processes.MODULES)) for round_ in rng.sample(range(1, ROUNDS - 1), 12)}
    crash_round = rng.choice([r for r in range(2, ROUNDS - 1) if r not in kills])
    processes = Processes(settings, tmp_path)
    for name in Processes.MODULES:
        processes.start(name)
    started = time.monotonic()
    killed: dict[str, int] = {}
    try:
        async with Publisher(settings) as publish:
            for round_ in range(ROUNDS):
                segment_commands = [maker.segment_command(model) for _ in range(SEGMENT_COMMANDS_PER_ROUND)]
                for command in segment_commands:
                    model.apply(command)
                    await publish.segment(command)
                await wait_stored(pool, [c["command_id"] for c in segment_commands])
                user_commands = [with_short_ttls(maker.user_command(), rng) for _ in range(USER_COMMANDS_PER_ROUND)]
                for command in user_commands:
                    model.apply(command)
                sending = asyncio.create_task(publish.users(user_commands))
                ids = [c["command_id"] for c in user_commands]
                if round_ in kills:
                    await wait_stored(pool, ids, at_least=rng.randint(20, 500))  # mid-stream
                    processes.kill(kills[round_])
                    killed[kills[round_]] = killed.get(kills[round_], 0) + 1
                if round_ == crash_round:
                    await wait_stored(pool, ids, at_least=rng.randint(20, 500))
                    await asyncio.to_thread(infra.postgres.stop, "immediate")  # a crash, not a shutdown
                    await asyncio.sleep(1.5)  # every process meets a dead database and backs off
                    await asyncio.to_thread(infra.postgres.start)
                await sending
                await wait_stored(pool, ids)
        await settled(pool)
    finally:
        exit_codes = processes.stop_all()
    elapsed = time.monotonic() - started
    assert set(killed) == set(Processes.MODULES), killed  # every kind of process was killed at least once
    assert exit_codes == dict.fromkeys(Processes.MODULES, 0)  # the last ones stopped gracefully

    history = await pool.fetch("SELECT id, user_id, segment_slug, operation, executed_at, source, reason, "
                               "command_id, expires_at FROM membership_history")
    rollouts = await pool.fetch("SELECT id, segment_slug, old_percent, new_percent, reason, command_id "
                                "FROM rollout_events")
    expired = sum(1 for row in history if row["reason"] == "ttl")
    assert expired > 1000
    records = await read_topic(settings, settings.membership_changes_topic, sys.maxsize, timeout=180, quiet=3)
    found = problems([record.value for record in records], history, rollouts)
    assert found == [], "\n".join(found[:20])
    print(f"\nchange stream under faults: {maker.count} commands, {len(history)} history rows ({expired} TTL exits), "
          f"{len(rollouts)} rollout changes, {len(records)} events published "
          f"({len(records) - len(history) - len(rollouts)} repeats), kills {killed}, 1 PostgreSQL crash, "
          f"{elapsed:.0f}s")
