"""Chaos: 20,000 random commands of all five types while the consumer process is SIGKILLed again and
again, PostgreSQL crashes once, and a second consumer joins and leaves. At the end everything
stored equals what a simple model of the contract predicts."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from services.query_api.app import create_app
from shared.client import OutcomeReader
from tests.contract_model import CommandMaker, ContractModel
from tests.support import Publisher, service_env

pytestmark = pytest.mark.integration

SEED = 20261128
ROUNDS = 20
SEGMENT_COMMANDS_PER_ROUND = 20
USER_COMMANDS_PER_ROUND = 980  # 20 × (20 + 980) = 20,000 commands, repeats of earlier ids included
DATABASE_DOWN = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


async def stored_count(pool, command_ids: list[str]) -> int:
    """How many of these outcomes are stored; 0 while the database is down."""
    try:
        return await pool.fetchval("SELECT count(*) FROM command_outcomes WHERE command_id = ANY($1::text[])",
                                   command_ids)
    except DATABASE_DOWN:
        return 0


async def wait_stored(pool, command_ids: list[str], at_least: int | None = None, timeout: float = 120) -> None:
    wanted = len(set(command_ids)) if at_least is None else at_least
    deadline = time.monotonic() + timeout
    while (count := await stored_count(pool, command_ids)) < wanted:
        assert time.monotonic() < deadline, f"{count} of {wanted} outcomes stored after {timeout}s"
        await asyncio.sleep(0.01)


class Consumers:
    """Command consumer processes, as they run in production."""

    def __init__(self, settings, log_dir) -> None:
        self.env = service_env(settings, CONSUMER_MAX_BATCH="100", CONSUMER_METRICS_PORT="0",
                               DB_RETRY_ATTEMPTS="100", DB_RETRY_MAX_BACKOFF_SECONDS="0.5")
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.started)}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "services.command_consumer"], env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started.append(process)
        return process

    def stop_all(self) -> list[int]:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.started:
            try:
                codes.append(process.wait(30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


async def test_chaos_kills_crash_and_rebalance_lose_and_repeat_nothing(infra, settings, pool, tmp_path):
    if infra.postgres is None:
        pytest.skip("restarts the embedded PostgreSQL the test session owns")
    rng = random.Random(SEED)
    model = ContractModel()
    maker = CommandMaker(rng, [f"SEG_{i}" for i in range(12)], users=2000)
    kill_rounds = set(rng.sample(range(1, ROUNDS - 1), 6))
    crash_round = rng.choice([r for r in range(2, ROUNDS - 1) if r not in kill_rounds])
    join_round, leave_round = 6, 12
    consumers = Consumers(settings, tmp_path)
    primary = consumers.start("primary")
    secondary = None
    kills = crashes = published = 0
    all_ids: list[str] = []
    started = time.monotonic()
    try:
        async with Publisher(settings) as publish:
            for round_ in range(ROUNDS):
                segment_commands = [maker.segment_command(model) for _ in range(SEGMENT_COMMANDS_PER_ROUND)]
                for command in segment_commands:
                    model.apply(command)  # one topic at a time: segment commands, then user commands
                    await publish.segment(command)
                await wait_stored(pool, [c["command_id"] for c in segment_commands])

                user_commands = []
                for _ in range(USER_COMMANDS_PER_ROUND):  # 1 % repeat an earlier command, id and all
                    repeat = user_commands and rng.random() < 0.01
                    user_commands.append(rng.choice(user_commands) if repeat else maker.user_command())
                for command in user_commands:
                    model.apply(command)
                sending = asyncio.create_task(publish.users(user_commands))
                ids = [c["command_id"] for c in user_commands]
                all_ids += [c["command_id"] for c in segment_commands] + ids
                published += len(segment_commands) + len(user_commands)

                if round_ == join_round:
                    secondary = consumers.start("secondary")  # joins: partitions are revoked and moved
                if round_ == leave_round and secondary is not None:
                    secondary.send_signal(signal.SIGTERM)  # leaves the group cleanly
                if round_ in kill_rounds:
                    await wait_stored(pool, ids, at_least=rng.randint(20, 400))  # mid-stream
                    primary.send_signal(signal.SIGKILL)
                    primary.wait()
                    kills += 1
                    primary = consumers.start("primary")
                if round_ == crash_round:
                    await wait_stored(pool, ids, at_least=rng.randint(20, 400))
                    await asyncio.to_thread(infra.postgres.stop, "immediate")  # a crash, not a shutdown
                    await asyncio.sleep(1.5)  # the consumers meet a dead database and back off
                    await asyncio.to_thread(infra.postgres.start)
                    crashes += 1
                await sending
                await wait_stored(pool, ids)
    finally:
        exit_codes = consumers.stop_all()
    elapsed = time.monotonic() - started
    assert kills >= 5 and crashes == 1 and secondary is not None
    assert exit_codes[-1] == 0  # the last primary stopped gracefully on SIGTERM

    await asyncio.sleep(0.2)
    counts = await model.assert_matches(pool)  # state, history, rollout events, outcomes: nothing lost or doubled
    assert counts["outcomes"] == len(set(all_ids))

    async with OutcomeReader(settings, from_beginning=True) as outcomes:  # every outcome was published
        seen = await outcomes.wait_for(set(all_ids), timeout=60)
    assert len(seen) == len(set(all_ids))

    app = create_app(settings)  # reads agree with the model, never-seen users included
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test") as http:
        for user_id in rng.sample(range(1, 2100), 300):
            response = await http.get(f"/users/{user_id}/segments")
            assert [s["slug"] for s in response.json()["segments"]] == model.members_of(user_id), user_id

    lost = len(set(all_ids)) - counts["outcomes"]
    doubled = counts["history rows"] - counts["history rows predicted"]
    print(f"\nchaos: {published} commands published ({published - len(set(all_ids))} repeated ids), "
          f"{kills} SIGKILLs, {crashes} PostgreSQL crash, 1 consumer joined and left, {elapsed:.0f}s; "
          + ", ".join(f"{name} {value}" for name, value in counts.items())
          + f"; outcomes missing {lost}, history rows beyond the model {doubled}")
