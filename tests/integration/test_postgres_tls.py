"""PostgreSQL over TLS, for real on the client side: the embedded server is built without SSL, so
a proxy in front of it answers PostgreSQL's SSLRequest and completes the TLS handshake with a
certificate made here. `sslmode=verify-full` with `sslrootcert` works for the migrations
(psycopg), every service's pool (asyncpg: the consumer, the API, the expiry worker) and plain
connections; a server whose certificate names another host is refused with a message that says so."""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import trustme

from services.command_consumer.bootstrap import build_consumer
from services.expiry_worker.worker import expire_batch
from services.query_api.app import create_app
from shared.db import apply_migrations, create_pool
from tests.proxies import PostgresTlsProxy
from tests.support import Publisher, wait_for_outcomes

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(os.environ.get("DATABASE_URL") or os.environ.get("TEST_INFRA")),
                                 reason="starts an embedded PostgreSQL of its own with TLS")]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_postgres(ca, infra, tmp_path):
    """start(names) → the port of a TLS front (certificate for `names`) to the session's server."""
    if infra.postgres is None:
        pytest.skip("needs the embedded PostgreSQL the test session owns")
    proxies: list[PostgresTlsProxy] = []

    async def start(names: tuple[str, ...]) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        proxy = PostgresTlsProxy(infra.postgres.port, context)
        proxies.append(proxy)
        return await proxy.start()

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    try:
        yield start, ca_file
    finally:
        for proxy in proxies:
            await proxy.stop()


def verify_full(port: int, ca_file, database: str = "postgres") -> str:
    return f"postgresql://postgres@localhost:{port}/{database}?sslmode=verify-full&sslrootcert={quote(str(ca_file))}"


async def test_every_service_migrations_and_plain_connections_work_with_verify_full(tls_postgres, settings):
    start, ca_file = tls_postgres
    port = await start(("localhost",))
    database = f"tls_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(verify_full(port, ca_file))
    try:
        await admin.execute(f"CREATE DATABASE {database}")
        assert admin.get_server_version().major >= 17  # a real server answered, through TLS
        assert isinstance(admin._transport.get_extra_info("ssl_object"), ssl.SSLObject)
    finally:
        await admin.close()
    url = verify_full(port, ca_file, database)
    assert "0001_initial_schema" in await asyncio.to_thread(apply_migrations, url)  # psycopg, verify-full

    tls = settings.model_copy(update={"database_url": url})
    pool = await create_pool(url)
    try:
        consumer = build_consumer(tls, pool)
        consuming = asyncio.create_task(consumer.run())
        async with Publisher(tls) as publish:
            await publish.segment({"type": "create_segment", "slug": "TLS", "command_id": "s"})
            await wait_for_outcomes(pool, ["s"])
            await publish.user({"type": "update_user_segments", "user_id": 7, "add": ["TLS"], "command_id": "u"})
            await wait_for_outcomes(pool, ["u"])
        consumer.stop()
        await consuming
        async with pool.acquire() as conn:
            assert (await expire_batch(conn, 100)).removed == 0  # the worker's statement, over TLS
        app = create_app(tls)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as api:
            assert (await api.get("/readyz")).json()["checks"]["database"] == "ok"
            assert (await api.get("/segments")).json()["segments"][0]["slug"] == "TLS"
    finally:
        await pool.close()


async def test_a_server_whose_certificate_names_another_host_is_refused_clearly(tls_postgres):
    start, ca_file = tls_postgres
    port = await start(("db.example.com",))
    with pytest.raises(SystemExit, match=r"(?i)Cannot connect to PostgreSQL.*hostname mismatch"):
        await create_pool(verify_full(port, ca_file))
