"""The PostgreSQL pool and migrations, shared by every service."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import orjson
import structlog

from shared import tracing
from shared.settings.base import redact

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# A write on a server that has become a standby (a failed-over primary reached through an address
# that still leads to it), and a connection its server's death left in the middle of an
# operation: retried on a new connection (writable() closes this one).
UNUSABLE_CONNECTION = (asyncpg.ReadOnlySQLTransactionError, asyncpg.InternalClientError)

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
    *UNUSABLE_CONNECTION,
)


@contextlib.asynccontextmanager
async def writable(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pool connection for writes. One that meets a read-only server, or that a server's death
    left unusable, is closed, not handed back: the retry opens a new one, which a URL with
    `target_session_attrs=read-write` (or `primary`) leads to the current primary
    (docs/operations.md, Highly available PostgreSQL)."""
    async with pool.acquire() as conn:
        try:
            yield conn
        except UNUSABLE_CONNECTION:
            conn.terminate()
            raise


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


async def _init_connection(connection: asyncpg.Connection, prepare: Sequence[str] = ()) -> None:
    # Binary codecs (jsonb's binary form is a version byte, then the text) so that COPY works too.
    await connection.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                                    encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))
    await connection.set_type_codec("json", schema="pg_catalog", format="binary",
                                    encoder=orjson.dumps, decoder=orjson.loads)
    # Into the statement cache the connection's queries look in first. `prepare()` keeps its
    # statement out of that cache, so the first query sending the same text would parse it again;
    # `executemany` with no rows prepares through the cache and executes nothing (asyncpg's own:
    # no span of tracing for a connection opening).
    prepare_cached = tracing.unwrapped(asyncpg.Connection.executemany)
    for statement in prepare:
        await prepare_cached(connection, statement, [])


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset for users that never change session state (no SET, LISTEN or advisory locks):
    skips asyncpg's default reset query, a round trip on every release. Open transactions are
    still rolled back by asyncpg before this runs."""


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 10,
                      reset_sessions: bool = True, server_settings: dict[str, str] | None = None,
                      exit_on_failure: bool = True, connection_class: type = asyncpg.Connection,
                      prepare: Sequence[str] = (), command_timeout: float | None = 60) -> asyncpg.Pool:
    """A pool of `min_size` open connections; a server that cannot be reached ends the process
    with a message naming it, unless `exit_on_failure` is off (the error is raised).

    A connection is replaced only when it fails or, above `min_size`, after 5 minutes unused: not
    after asyncpg's default of 50,000 queries. Its replacement is opened by the request that
    needs it, on a cold server backend, and learns its types again (the jsonb codec's array type
    is a catalog query of tens of milliseconds on a busy server): at 2,000 queries a second over
    ten connections, one replacement, and one request stalled, every 25 s. Every statement the
    services send is one of a fixed few, so a backend's memory does not grow with its age.
    `prepare`: statements each new connection prepares once opened, into its statement cache, so
    that their parse, type look-ups and the backend's catalog reads happen then, not in the first
    request that sends them. `command_timeout`: seconds a statement may take before the client
    gives up on it (a connection that stopped answering), None for none."""
    try:
        return await asyncpg.create_pool(
            database_url, min_size=min_size, max_size=max_size, max_queries=math.inf,
            init=functools.partial(_init_connection, prepare=tuple(prepare)), command_timeout=command_timeout,
            reset=None if reset_sessions else _keep_session, server_settings=server_settings,
            connection_class=connection_class,
        )
    except (OSError, asyncpg.PostgresError) as error:
        if not exit_on_failure:
            raise
        if isinstance(error, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):  # a statement to prepare
            raise SystemExit(
                f"PostgreSQL at {redact(database_url)} does not have the schema this version needs ({error}): "
                "apply the migrations first (`python -m devstack migrate`, or the `provision` job).") from error
        raise SystemExit(
            f"Cannot connect to PostgreSQL at {redact(database_url)}: {error}. "
            "Set DATABASE_URL to a reachable server, or unset it to let `make run` start the embedded one."
        ) from error


def yoyo_url(database_url: str) -> str:
    """yoyo picks its driver from the scheme; psycopg 3 is the one installed. yoyo reads one
    host:port from the URL, so a URL naming several hosts hands them to libpq as its `host` and
    `port` lists instead, with the other parameters (target_session_attrs) as they are."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + _hosts_as_parameters(database_url[len(prefix):])
    return database_url


def _hosts_as_parameters(rest: str) -> str:
    """`user:pass@h1:p1,h2:p2/db?x=y` → `user:pass@/db?host=h1,h2&port=p1,p2&x=y` (one host: as is)."""
    from urllib.parse import quote

    authority, _, tail = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if "," not in hosts:
        return rest
    names, ports = [], []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        names.append((name if colon else host).strip("[]"))
        ports.append(port if colon else "5432")
    path, _, query = tail.partition("?")
    listed = f"host={quote(','.join(names), safe=',')}&port={','.join(ports)}"
    return f"{userinfo}{at}/{path}?{listed}" + (f"&{query}" if query else "")


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
