"""The PostgreSQL pool and migrations, shared by every service."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncpg
import orjson
import structlog

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Errors after which the same transaction can succeed once the database is back.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.TooManyConnectionsError,
)


class Backoff:
    """Waits between attempts on an unavailable database: from 0.1 s, doubling up to `cap`
    seconds, each drawn between half and one and a half times that (jitter, so that many clients
    do not come back at once). `reset()` after a success."""

    def __init__(self, cap: float) -> None:
        self._cap = cap
        self._delay = 0.1

    def reset(self) -> None:
        self._delay = 0.1

    def next(self) -> float:
        wait = self._delay * (0.5 + random.random())
        self._delay = min(self._delay * 2, self._cap)
        return wait


async def _init_connection(connection: asyncpg.Connection) -> None:
    # Binary codecs (jsonb's binary form is a version byte, then the text) so that COPY works too.
    await connection.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                                    encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))
    await connection.set_type_codec("json", schema="pg_catalog", format="binary",
                                    encoder=orjson.dumps, decoder=orjson.loads)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset for users that never change session state (no SET, LISTEN or advisory locks):
    skips asyncpg's default reset query, a round trip on every release. Open transactions are
    still rolled back by asyncpg before this runs."""


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 10,
                      reset_sessions: bool = True, server_settings: dict[str, str] | None = None,
                      exit_on_failure: bool = True, connection_class: type = asyncpg.Connection) -> asyncpg.Pool:
    """A pool of `min_size` open connections; a server that cannot be reached ends the process
    with a message naming it, unless `exit_on_failure` is off (the error is raised)."""
    try:
        return await asyncpg.create_pool(
            database_url, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=60,
            reset=None if reset_sessions else _keep_session, server_settings=server_settings,
            connection_class=connection_class,
        )
    except (OSError, asyncpg.PostgresError) as error:
        if not exit_on_failure:
            raise
        raise SystemExit(
            f"Cannot connect to PostgreSQL at {redact(database_url)}: {error}. "
            "Set DATABASE_URL to a reachable server, or unset it to let `make run` start the embedded one."
        ) from error


def yoyo_url(database_url: str) -> str:
    """yoyo picks its driver from the scheme; psycopg 3 is the one installed."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url


def apply_migrations(database_url: str, before: str | None = None) -> list[str]:
    """Apply pending migrations (only those whose id sorts before `before`, if given: tests and
    benchmarks of an upgrade); a second call is a no-op. Returns the ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    if before is not None:
        migrations = migrations.filter(lambda migration: migration.id < before)
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [migration.id for migration in pending]
    finally:
        backend.connection.close()


def redact(database_url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return database_url
