"""Model-based: a hypothesis state machine drives commands and reads through the real pipeline
(producer → broker → consumer → PostgreSQL → query API) and compares every step with the model.

Each example owns a namespace (slug prefix, user id range, command id prefix) in one shared
database, topic set and consumer, so examples need no reset and the consumer group joins once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from services.command_consumer.bootstrap import build_consumer
from services.query_api.app import create_app
from shared.client import CommandPublisher
from shared.db import create_pool
from tests.contract_model import PERCENTS, ContractModel, Scope

pytestmark = pytest.mark.integration
USERS_PER_EXAMPLE = 6


class Pipeline:
    """The real parts, on a private event loop the synchronous state machine drives."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.runner = asyncio.Runner()
        self.runner.run(self._start())

    async def _start(self) -> None:
        self.pool = await create_pool(self.settings.database_url, min_size=1, max_size=4)
        self.publisher = CommandPublisher(self.settings)
        await self.publisher.start()
        self.consumer = build_consumer(self.settings, self.pool)
        self.consuming = asyncio.create_task(self.consumer.run())
        self.app = create_app(self.settings)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api.test")

    def run(self, coroutine):
        return self.runner.run(coroutine)

    async def send(self, command: dict) -> dict:
        """Publish, then wait until the outcome is stored: each step sees the previous one applied."""
        await self.publisher.publish(command)
        deadline = time.monotonic() + 30
        while (row := await self.pool.fetchrow(
                "SELECT status, error->>'code' AS code FROM command_outcomes WHERE command_id = $1",
                command["command_id"])) is None:
            assert time.monotonic() < deadline, f"no outcome for {command}"
            await asyncio.sleep(0.005)
        return dict(row)

    def close(self) -> None:
        async def stop():
            await self.http.aclose()
            await self.lifespan.__aexit__(None, None, None)
            self.consumer.stop()
            await asyncio.wait_for(self.consuming, 30)
            await self.publisher.stop()
            await self.pool.close()

        try:
            self.run(stop())
        finally:
            self.runner.close()


def build_machine(pipeline: Pipeline):
    examples = itertools.count(1)

    class SegmentationMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(examples)
            self.prefix = f"E{n}_"
            self.scope = Scope(range(n * 100 + 1, n * 100 + 1 + USERS_PER_EXAMPLE), self.prefix)
            self.model = ContractModel(universe=self.scope.users)
            self.sent: list[dict] = []
            self.ids = itertools.count(1)

        slugs = st.sampled_from("ABC")
        users = st.integers(1, USERS_PER_EXAMPLE)
        percents = st.sampled_from(PERCENTS)

        def _send(self, command: dict) -> None:
            command["command_id"] = command.get("command_id") or f"{self.prefix}{next(self.ids)}"
            self.model.apply(command)
            stored = pipeline.run(pipeline.send(command))
            assert (stored["status"], stored["code"]) == self.model.outcomes[command["command_id"]], command
            self.sent.append(command)

        def _user(self, index: int) -> int:
            return self.scope.users[index - 1]

        @initialize(a=percents, b=percents)
        def two_segments_to_start_with(self, a, b):
            self._send({"type": "create_segment", "slug": self.prefix + "A", "percent": a})
            self._send({"type": "create_segment", "slug": self.prefix + "B", "percent": b})

        @rule(slug=slugs, percent=percents)
        def create_segment(self, slug, percent):
            self._send({"type": "create_segment", "slug": self.prefix + slug, "percent": percent})

        @rule(slug=slugs, percent=percents)
        def update_segment(self, slug, percent):
            self._send({"type": "update_segment", "slug": self.prefix + slug, "percent": percent})

        @rule(slug=slugs)
        def delete_segment(self, slug):
            self._send({"type": "delete_segment", "slug": self.prefix + slug})

        @rule(user=users)
        def create_user(self, user):
            self._send({"type": "create_user", "user_id": self._user(user)})

        @rule(user=users, add=st.lists(slugs, max_size=3), remove=st.lists(slugs, max_size=3),
              ttl=st.none() | st.integers(3600, 86_400 * 30))
        def update_user_segments(self, user, add, remove, ttl):
            command = {"type": "update_user_segments", "user_id": self._user(user),
                       "add": [self.prefix + s for s in add], "remove": [self.prefix + s for s in remove]}
            if ttl is not None:
                command["ttl_seconds"] = ttl
            self._send(command)

        @rule(user=users, slug=slugs, percent=percents, then=st.sampled_from(["remove", "add", "keep"]))
        def percent_change_over_an_explicit_row(self, user, slug, percent, then):
            """An explicit membership (or, removed, an exclusion) held across a percent change,
            then ended or not: the change must not move the user, in its report too."""
            user_id, slug = self._user(user), self.prefix + slug
            self._send({"type": "update_user_segments", "user_id": user_id,
                        "add" if then != "add" else "remove": [slug]})
            self._send({"type": "update_segment", "slug": slug, "percent": percent})
            if then != "keep":
                self._send({"type": "update_user_segments", "user_id": user_id, then: [slug]})

        @precondition(lambda self: self.sent)
        @rule(data=st.data())
        def repeat_a_command(self, data):
            """The same command id again (a producer retry): nothing changes, same outcome."""
            self._send(dict(data.draw(st.sampled_from(self.sent))))

        @rule(user=users)
        def read_user_segments(self, user):
            user_id = self._user(user)
            expected = self.model.members_of(user_id)

            async def read():
                deadline = time.monotonic() + 1.0  # the contract's freshness bound
                while True:
                    response = await pipeline.http.get(f"/users/{user_id}/segments")
                    assert response.status_code == 200
                    mine = [s["slug"] for s in response.json()["segments"] if self.scope.slug(s["slug"])]
                    if mine == expected or time.monotonic() > deadline:
                        return mine
                    await asyncio.sleep(0.02)

            assert pipeline.run(read()) == expected

        @invariant()
        def segments_list_matches(self):
            response = pipeline.run(pipeline.http.get("/segments"))
            live = {s["slug"]: s["percent"] for s in response.json()["segments"] if self.scope.slug(s["slug"])}
            assert live == {slug: float(percent) for slug, percent in self.model.segments.items()}

        def teardown(self):
            pipeline.run(self.model.assert_matches(pipeline.pool, self.scope))
            for user_id in self.scope.users:
                assert pipeline.run(self._report_of(user_id)) == {
                    slug: rows for (user, slug), rows in self.model.report.items() if user == user_id}, user_id

        async def _report_of(self, user_id: int) -> dict[str, list[tuple[str, str, str]]]:
            """The user's report for this month, each segment's rows in order (rows of one moment
            are ordered by slug, so across segments the model's order is not the report's)."""
            now = datetime.now(UTC)
            link = (await pipeline.http.get("/reports/history", params={
                "year": now.year, "month": now.month, "user_id": user_id})).json()["report_link"]
            parts = urlsplit(link)
            rows: dict[str, list[tuple[str, str, str]]] = {}
            for line in (await pipeline.http.get(f"{parts.path}?{parts.query}")).text.splitlines()[1:]:
                _user, slug, operation, _at, source, reason = line.split(",")
                if self.scope.slug(slug):
                    rows.setdefault(slug, []).append((operation, source, reason))
            return rows

    return SegmentationMachine


def test_pipeline_behaves_like_the_contract_model(settings):
    pipeline = Pipeline(settings.model_copy(update={"consumer_fetch_max_wait_ms": 5}))
    try:
        machine = build_machine(pipeline)
        run_state_machine_as_test(machine, settings=settings_for_ci())
    finally:
        pipeline.close()


def settings_for_ci():
    # No shrinking: every replay goes through the real broker and database, and shrinking a failure
    # would take longer than the whole suite; the failing example is printed step by step as it ran.
    return settings(max_examples=25, stateful_step_count=25, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
