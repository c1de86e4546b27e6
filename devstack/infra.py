"""The real servers a test session or a benchmark runs against.

- default: the embedded Tansu broker and embedded PostgreSQL, started on free ports and stopped
  at the end of the session;
- DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS set: those servers instead (each independently);
- TEST_INFRA=docker: Apache Kafka and PostgreSQL containers through testcontainers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from devstack.embedded import EmbeddedKafka, EmbeddedPostgres
from shared.settings.base import running_stack

KAFKA_IMAGE = os.environ.get("TEST_KAFKA_IMAGE", "apache/kafka:3.9.1")
POSTGRES_IMAGE = os.environ.get("TEST_POSTGRES_IMAGE", "postgres:17-alpine")


@dataclass
class Infra:
    database_url: str
    kafka_bootstrap_servers: str
    postgres: EmbeddedPostgres | None = None  # set when the test session owns the server
    kafka: EmbeddedKafka | None = None
    _exit: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        self._exit.close()


def start_infra(running_stack_too: bool = False) -> Infra:
    """The servers named by DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS, else (`running_stack_too`, for
    tools a person runs beside `make run`) those of the running stack, else embedded ones of its own.
    The test suite never takes a running stack's: its servers are its own or the ones it was given."""
    exit_stack = ExitStack()
    try:
        if os.environ.get("TEST_INFRA") == "docker":
            return _containers(exit_stack)
        running = running_stack() if running_stack_too else {}
        database_url = os.environ.get("DATABASE_URL") or running.get("database_url")
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or running.get("kafka_bootstrap_servers")
        postgres = kafka = None
        if not database_url:
            work_dir = Path(tempfile.mkdtemp(prefix="segmentation-test-"))
            exit_stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
            postgres = EmbeddedPostgres(work_dir / "postgres")
            exit_stack.callback(postgres.remove)  # stopped, and its data gone (as root: its home too)
            database_url = postgres.start()
        if not bootstrap:
            kafka = EmbeddedKafka()
            bootstrap = kafka.start()
            exit_stack.callback(kafka.stop)
        return Infra(database_url, bootstrap, postgres, kafka, exit_stack)
    except BaseException:
        exit_stack.close()
        raise


def _containers(exit_stack: ExitStack) -> Infra:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    postgres = exit_stack.enter_context(PostgresContainer(POSTGRES_IMAGE, driver=None))
    kafka = exit_stack.enter_context(KafkaContainer(KAFKA_IMAGE).with_kraft())
    return Infra(postgres.get_connection_url(), kafka.get_bootstrap_server(), _exit=exit_stack)


async def fresh_database(admin_url: str, name: str, migrated_before: str | None = None) -> str:
    """Create (or recreate) database `name` on the server, migrated (only up to the migrations
    before `migrated_before`, if given: an upgrade to test); returns its URL."""
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    from shared.db import apply_migrations

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    apply_migrations(url, migrated_before)
    return url


async def drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()
