"""A read that starts after a command's outcome is stored reflects that command, for every command
type, in every API worker: the periodic refresh of the rollout list is set to an hour, so only the
catalogue version each read's own query returns can make the segment commands visible."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from services.query_api.app import create_app
from tests.buckets import user_in_buckets
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def api_worker(settings):
    app = create_app(settings.model_copy(update={"rollout_cache_refresh_seconds": 3600.0}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            yield client


async def slugs(api: httpx.AsyncClient, user_id: int, **params) -> list[str]:
    response = await api.get(f"/users/{user_id}/segments", params=params)
    assert response.status_code == 200, response.text
    return [segment["slug"] for segment in response.json()["segments"]]


async def test_every_command_type_is_visible_to_the_next_read_in_every_worker(settings, pool):
    user = user_in_buckets("RYW", 0, 2000)  # covered once the percent reaches 20
    async with Publisher(settings) as publish, running_consumer(settings, pool), \
            api_worker(settings) as first, api_worker(settings) as second:
        workers = (first, second)
        for api in workers:  # both have loaded their (empty) rollout list
            assert await slugs(api, user) == []

        async def apply(command: dict, publisher) -> None:
            await publisher(command)
            await wait_for_outcomes(pool, [command["command_id"]])

        await apply({"type": "create_segment", "slug": "RYW", "percent": 50, "command_id": "create"}, publish.segment)
        for api in workers:
            assert await slugs(api, user) == ["RYW"]
        await apply({"type": "update_segment", "slug": "RYW", "percent": 10, "command_id": "lower"}, publish.segment)
        for api in workers:
            assert await slugs(api, user) == []
        await apply({"type": "update_user_segments", "user_id": user, "add": ["RYW"], "command_id": "add"},
                    publish.user)
        for api in workers:
            assert await slugs(api, user) == ["RYW"]
        await apply({"type": "update_segment", "slug": "RYW", "percent": 50, "command_id": "half"}, publish.segment)
        await apply({"type": "update_user_segments", "user_id": user, "remove": ["RYW"], "command_id": "rm"},
                    publish.user)  # covered: an exclusion
        await apply({"type": "update_segment", "slug": "RYW", "percent": 100, "command_id": "all"}, publish.segment)
        for api in workers:
            assert await slugs(api, user) == []  # excluded explicitly, whatever the percent
            assert await slugs(api, user + 1) == ["RYW"]  # another user: covered at 100 %
        await apply({"type": "delete_segment", "slug": "RYW", "command_id": "delete"}, publish.segment)
        for api in workers:
            assert await slugs(api, user + 1) == []
        await apply({"type": "create_user", "user_id": 424242, "command_id": "user"}, publish.user)
        for api in workers:
            assert (await api.get("/users/424242")).status_code == 200
            assert (await api.get("/commands/user")).json()["status"] == "applied"
