"""API keys with scopes on every route: 401 without a valid key, 403 without the scope; the open
routes stay open; report links are the credential; the actor is the key's name; keys reload."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from pydantic import SecretStr

from services.query_api.app import create_app
from shared.api_keys import new_key
from shared.query_client import QueryApiError, QueryClient
from shared.settings import DEVELOPMENT_REPORT_SECRET
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration

# (method, path, scope it needs, statuses a valid key with that scope may get)
ROUTES = [
    ("GET", "/users/1000/segments", "read", {200}),
    ("GET", "/users/1000", "read", {404}),
    ("GET", "/segments", "read", {200}),
    ("GET", "/segments/A", "read", {404}),
    ("GET", "/users/1000/history?year=2026&month=11", "reports", {200}),
    ("GET", "/reports/history?year=2026&month=11", "reports", {200}),
    ("GET", "/commands/c-1", "status", {404}),
    ("POST", "/commands", "write", {202}),
]
COMMAND = {"type": "create_user", "user_id": 1000}


class Keys:
    """Keys written to an API_KEYS_FILE: one per scope and one with all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = {}
        lines = []
        for name, scopes in [("reader", ["read"]), ("reporter", ["reports"]), ("writer", ["write"]),
                             ("watcher", ["status"]), ("admin", ["read", "reports", "write", "status"])]:
            self.keys[name], line = new_key(name, scopes)
            lines.append(line)
        path.write_text("# name:scopes:sha256\n" + "\n".join(lines) + "\n")

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "api-keys")


@pytest.fixture
async def secured(settings, keys):
    """The API in-process with access control on."""
    app = create_app(settings.model_copy(update={"api_keys_file": keys.path}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            client.app = app
            yield client


async def call(client: httpx.AsyncClient, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    if method == "POST":
        return await client.post(path, json=COMMAND, headers=headers)
    return await client.get(path, headers=headers)


async def test_every_route_needs_a_valid_key_with_its_scope(secured, keys):
    holder = {"read": "reader", "reports": "reporter", "write": "writer", "status": "watcher"}
    for method, path, scope, allowed in ROUTES:
        missing = await call(secured, method, path)
        assert missing.status_code == 401, (path, missing.text)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        forged = await call(secured, method, path, {"Authorization": "Bearer not-a-key"})
        assert forged.status_code == 401 and 'error="invalid_token"' in forged.headers["WWW-Authenticate"]
        for other_scope, name in holder.items():
            response = await call(secured, method, path, keys.header(name))
            if other_scope == scope:
                assert response.status_code in allowed, (path, name, response.text)
            else:
                assert response.status_code == 403, (path, name, response.text)
                assert repr(scope) in response.json()["detail"]
        assert (await call(secured, method, path, keys.header("admin"))).status_code in allowed


async def test_health_and_metrics_stay_open_and_metrics_can_be_closed(settings, secured, keys):
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert (await secured.get(path)).status_code == 200, path
    app = create_app(settings.model_copy(update={"api_keys_file": keys.path, "metrics_require_key": True}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            assert (await client.get("/metrics")).status_code == 401
            assert (await client.get("/metrics", headers=keys.header("watcher"))).status_code == 200
            assert (await client.get("/healthz")).status_code == 200


async def test_a_report_link_is_the_credential_for_its_lifetime(secured, keys):
    link = (await secured.get("/reports/history?year=2026&month=11", headers=keys.header("reporter"))).json()
    download = await secured.get(link["report_link"])  # no key
    assert download.status_code == 200 and download.text.startswith("user_id,segment_slug")


async def test_the_actor_is_the_keys_name_in_the_command_the_outcome_and_the_status(settings, pool, secured, keys):
    command = {"type": "create_user", "user_id": 7, "command_id": "who", "actor": "somebody-else"}
    published = await secured.post("/commands", json=command, headers=keys.header("writer"))
    assert published.status_code == 202
    async with running_consumer(settings, pool):
        await wait_for_outcomes(pool, ["who"])
    outcome = (await secured.get("/commands/who", headers=keys.header("watcher"))).json()
    assert outcome["actor"] == "writer" and outcome["status"] == "applied"


async def test_a_command_from_kafka_keeps_its_own_actor_in_the_outcome(settings, pool, api):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.user({"type": "create_user", "user_id": 8, "command_id": "k", "actor": "billing-service"})
        await wait_for_outcomes(pool, ["k"])
    assert (await api.get("/commands/k")).json()["actor"] == "billing-service"


async def test_a_key_added_to_the_file_works_and_a_removed_one_is_refused_without_a_restart(secured, keys):
    import asyncio

    fresh, line = new_key("late", ["read"])
    keys.path.write_text(keys.path.read_text() + line + "\n")

    async def status_with(key: str) -> int:
        return (await secured.get("/segments", headers={"Authorization": f"Bearer {key}"})).status_code

    async with asyncio.timeout(10):
        while await status_with(fresh) != 200:  # noqa: ASYNC110 - the file watcher's next look
            await asyncio.sleep(0.1)
    keys.path.write_text(keys.path.read_text().replace(line, "# revoked\n"))
    async with asyncio.timeout(10):
        while await status_with(fresh) != 401:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_sighup_reloads_the_keys_at_once(secured, keys):
    """The file changes in a way the watcher cannot see (same size, same modification time): only
    SIGHUP makes the API read it again."""
    info = keys.path.stat()
    text = keys.path.read_text()
    reader_line = next(line for line in text.splitlines() if line.startswith("reader:"))
    keys.path.write_text(text.replace(reader_line, "#" + reader_line[1:]))  # same length, revoked
    os.utime(keys.path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (await secured.get("/segments", headers=keys.header("reader"))).status_code == 200  # not seen yet
    os.kill(os.getpid(), signal.SIGHUP)
    import asyncio

    await asyncio.sleep(0.05)  # the handler runs on the event loop
    assert (await secured.get("/segments", headers=keys.header("reader"))).status_code == 401


async def test_a_broken_keys_file_stops_the_start_and_a_broken_reload_keeps_the_keys(settings, secured, keys,
                                                                                     tmp_path):
    broken = tmp_path / "broken-keys"
    broken.write_text("checkout:read:" + "0" * 64 + "\nbilling:read:the-key-itself\n")
    with pytest.raises(SystemExit, match=r"line 2: the third field is the key's SHA-256"):
        create_app(settings.model_copy(update={"api_keys_file": broken}))
    app = secured._transport.app
    keys.path.write_text("this is not a keys file\n")
    app.state.resources.keys.reload()
    assert (await secured.get("/segments", headers=keys.header("reader"))).status_code == 200


def test_production_refuses_to_start_without_keys_unless_a_gateway_authenticates(settings, keys):
    production = settings.model_copy(update={"environment": "production", "report_signing_secret": SecretStr("s" * 32),
                                             "api_public_url": "https://segments.example"})
    with pytest.raises(SystemExit, match="API_KEYS_FILE"):
        create_app(production)
    create_app(production.model_copy(update={"api_auth": "disabled"}))
    create_app(production.model_copy(update={"api_keys_file": keys.path}))


async def test_the_openapi_document_declares_the_bearer_scheme(secured):
    document = (await secured.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"]["ApiKey"][
            "description"]}
    assert {"ApiKey": []} in document["paths"]["/commands"]["post"]["security"]
    assert "security" not in document["paths"]["/healthz"]["get"]


async def test_the_python_client_sends_its_key_and_says_when_it_is_refused(secured, keys, pool):
    await pool.execute("INSERT INTO command_outcomes (command_id, type, status, processed_at, source_topic, "
                       "source_partition, source_offset) VALUES ('c-9', 'create_user', 'applied', now(), 't', 0, 9)")
    transport = secured._transport
    async with QueryClient("http://api.test", api_key=keys.keys["watcher"], transport=transport) as api:
        assert (await api.command_outcome("c-9"))["status"] == "applied"
        assert await api.command_outcome("c-unknown") is None
    async with QueryClient("http://api.test", api_key=keys.keys["reader"], transport=transport) as api:
        with pytest.raises(QueryApiError, match="SEGMENTCTL_API_KEY") as refused:
            await api.command_outcome("c-9")
        assert refused.value.status == 403
        assert await api.user_segments(1000) == []


async def test_access_control_on_the_public_default_secret_refuses_to_start(settings, keys):
    with pytest.raises(SystemExit, match="REPORT_SIGNING_SECRET"):
        create_app(settings.model_copy(update={"api_keys_file": keys.path,
                                               "report_signing_secret": SecretStr(DEVELOPMENT_REPORT_SECRET)}))


async def test_a_report_link_forged_with_the_public_default_gets_nothing(secured, keys):
    """The audit's proof: a token minted from the built-in secret for every user's CSV, with no key."""
    forged = URLSafeTimedSerializer(DEVELOPMENT_REPORT_SECRET, salt="history-report-v1").dumps(
        {"y": 2026, "m": 12, "u": None})
    refused = await secured.get("/reports/download", params={"token": forged})
    assert refused.status_code == 403 and "not valid" in refused.text
    link = (await secured.get("/reports/history?year=2026&month=12", headers=keys.header("reporter"))).json()
    assert (await secured.get(link["report_link"])).status_code == 200  # a real link still works


async def test_a_fast_path_token_is_checked_as_the_route_checks_it(secured, keys):
    """int(x, 16) took these on the fast path where the route answered 422."""
    for token in ("-1/-1", "0x10/0x1", "1_0/0", "f" * 5000 + "/1", " 0/1"):
        response = await secured.get("/users/1/segments", headers={**keys.header("reader"),
                                                                   "X-Consistency-Token": token})
        assert response.status_code == 422, (token[:20], response.status_code)


async def test_readyz_shows_a_key_file_whose_last_change_was_not_taken(secured, keys):
    assert (await secured.get("/readyz")).json()["checks"]["api_keys"] == "ok"
    keys.path.write_text("not a key line\n")
    secured.app.state.resources.keys.reload()
    ready = await secured.get("/readyz")
    assert ready.status_code == 200  # the keys before the change stay in force
    assert ready.json()["checks"]["api_keys"].startswith("the last change of the file was not taken")
