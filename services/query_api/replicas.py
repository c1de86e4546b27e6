"""Where a read goes: the primary, or a streaming replica that is recent enough (README: "Reads
from replicas").

Each API worker measures every replica every REPLICA_POLL_INTERVAL_MS: its replay position against
the primary's write position, sampled on the same tick. A replica's lag is the age of the oldest
primary position it has not replayed yet (0 when it has replayed everything the primary had).
A replica lagging more than MAX_REPLICA_LAG_MS, or unreachable, gets no reads until it is back.

- Hot reads and reports go to a healthy replica (in turn), else to the primary.
- A read with a consistency token goes to a replica known to have replayed that position; it
  waits up to READ_TOKEN_WAIT_MS for one, then goes to the primary.
- Reads that must see the latest write (command status) go to the primary.
- A server that fails a read is passed over and the read is tried on the next one; when none can
  answer, the caller gets the error (503 with Retry-After from the app).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import structlog
from prometheus_client import Counter, Gauge

from services.query_api.batched_lookup import BatchedLookup, Found
from services.query_api.readmodel import USER_SEGMENTS_SQL, create_lookup_pool
from shared.db import TRANSIENT_DB_ERRORS, create_pool
from shared.settings.base import redact

log = structlog.get_logger("query_api")
T = TypeVar("T")

REPLICA_LAG = Gauge("segmentation_replica_lag_seconds", "Replay lag of a read replica behind the primary",
                    ["replica"], multiprocess_mode="max")
REPLICA_HEALTHY = Gauge("segmentation_replica_healthy", "1 when a read replica receives reads", ["replica"],
                        multiprocess_mode="min")
READS = Counter("segmentation_reads_by_server_total",
                "Reads answered, by the server that answered them (only with READ_DATABASE_URLS)", ["server"])
# A promoted replica's pg_last_wal_replay_lsn() stays where its recovery ended: a server no longer
# in recovery is as new as the primary, whatever that function says.
REPLAYED_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END"
PRIMARY = "primary"


def parse_lsn(text: str) -> int:
    """PostgreSQL's '16/B374D848' as a number, for comparing positions."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class InvalidToken(ValueError):
    pass


# A consistency token is a WAL position as PostgreSQL writes it; the route's parameters and the fast
# path both check it with this pattern (int() alone would take "-1", "0x10" and "1_0").
TOKEN_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"
_TOKEN = re.compile(TOKEN_PATTERN)


def parse_token(token: str) -> int:
    if _TOKEN.fullmatch(token) is None:
        raise InvalidToken(f"not a consistency token: {token[:40]!r} (expected a WAL position like 0/16B3748, as "
                           "outcomes carry)")
    try:
        return parse_lsn(token)
    except ValueError:
        raise InvalidToken(f"not a consistency token: {token[:40]!r} (expected a WAL position like 0/16B3748, as "
                           "outcomes carry)") from None


@dataclass
class Server:
    name: str
    url: str
    pool: asyncpg.Pool | None = None  # reports and other reads
    memberships: BatchedLookup | None = None  # the hot read, on connections of its own
    state: str = "starting"  # ok, lagging, unreachable, starting
    replay: int = 0  # position replayed (replicas)
    lag_ms: float | None = None
    extra: list[asyncpg.Pool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.answered = READS.labels(self.name)

    @property
    def healthy(self) -> bool:
        return self.state == "ok"


class ReadRouter:
    def __init__(self, primary_pool: asyncpg.Pool, primary_memberships: BatchedLookup, replica_urls: list[str],
                 *, read_pool_size: int, pool_size: int, max_lag_ms: float, token_wait_ms: float,
                 poll_interval_ms: float) -> None:
        self.primary = Server(PRIMARY, "", primary_pool, primary_memberships, state="ok")
        self.replicas = [Server(redact(url).split("@")[-1].split("/")[0], url) for url in replica_urls]
        self._read_pool_size, self._pool_size = read_pool_size, pool_size
        self._max_lag_ms, self._token_wait = max_lag_ms, token_wait_ms / 1000
        self._interval = poll_interval_ms / 1000
        self._turn = itertools.count()
        self._primary_positions: collections.deque[tuple[float, int]] = collections.deque(maxlen=2000)
        self._polled = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- choosing --------------------------------------------------------------------------------
    def _replica_in_turn(self, candidates: list[Server]) -> Server | None:
        return candidates[next(self._turn) % len(candidates)] if candidates else None

    def replica_order(self) -> list[Server]:
        """Healthy replicas first (starting with the next in turn), then the primary."""
        healthy = [replica for replica in self.replicas if replica.healthy]
        if not healthy:
            return [self.primary]
        start = next(self._turn) % len(healthy)
        return [*healthy[start:], *healthy[:start], self.primary]

    async def token_order(self, token: int) -> list[Server]:
        """Replicas that have replayed `token` (waiting up to READ_TOKEN_WAIT_MS for one), then
        the primary."""
        deadline = time.monotonic() + self._token_wait
        while True:
            caught_up = [r for r in self.replicas if r.state in ("ok", "lagging") and r.replay >= token]
            if caught_up:
                chosen = self._replica_in_turn(caught_up)
                return [chosen, self.primary]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(r.state in ("ok", "lagging") for r in self.replicas):
                return [self.primary]
            self._polled.clear()
            try:
                await asyncio.wait_for(self._polled.wait(), remaining)
            except TimeoutError:
                return [self.primary]

    async def order(self, token: int | None) -> list[Server]:
        if not self.replicas:
            return [self.primary]
        return self.replica_order() if token is None else await self.token_order(token)

    # -- reading -----------------------------------------------------------------------------------
    async def memberships(self, user_id: int, token: int | None = None) -> Found:
        """The hot read's rows, from the first server in order that answers."""
        if not self.replicas:
            return await self.primary.memberships.read(user_id)
        return await self._first(await self.order(token), lambda server: server.memberships.read(user_id))

    async def read(self, query: Callable[[asyncpg.Pool], Awaitable[T]], *, replica_first: bool,
                   token: int | None = None) -> T:
        """`query` on a pool: replicas first (hot reads, reports) or the primary first (reads that
        want the latest write but may fall back to a recent replica)."""
        if not self.replicas:
            return await query(self.primary.pool)
        if replica_first:
            servers = await self.order(token)
        else:
            servers = [self.primary, *[r for r in self.replicas if r.healthy]]
        return await self._first(servers, lambda server: query(server.pool))

    async def _first(self, servers: list[Server], attempt: Callable[[Server], Awaitable[T]]) -> T:
        for server in servers[:-1]:
            try:
                result = await attempt(server)
            except TRANSIENT_DB_ERRORS as error:
                if server is not self.primary:
                    self._mark_unreachable(server, error)
            else:
                server.answered.inc()
                return result
        result = await attempt(servers[-1])
        servers[-1].answered.inc()
        return result

    # -- watching ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.replicas:
            await asyncio.gather(*(self._connect(replica) for replica in self.replicas))
            await self.poll()
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in self.replicas:
            for pool in replica.extra:
                await pool.close()

    async def _connect(self, replica: Server) -> bool:
        if replica.pool is not None:
            return True
        pool = None
        try:
            pool = await create_pool(replica.url, min_size=1, max_size=self._pool_size, reset_sessions=False,
                                     exit_on_failure=False)
            read_pool = await create_lookup_pool(replica.url, self._read_pool_size, exit_on_failure=False)
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as error:
            if pool is not None:  # tried again on the next poll: this one would hold its connections for good
                pool.terminate()
            self._mark_unreachable(replica, error)
            return False
        replica.pool, replica.memberships, replica.extra = pool, BatchedLookup(read_pool, USER_SEGMENTS_SQL), [
            pool, read_pool]
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception as error:  # the primary is away: replicas keep their last state
                log.warning("replica positions not measured", error=repr(error))

    async def poll(self) -> None:
        now = time.monotonic()
        primary_position = parse_lsn(await self.primary.pool.fetchval("SELECT pg_current_wal_lsn()::text"))
        self._primary_positions.append((now, primary_position))
        await asyncio.gather(*(self._measure(replica, now) for replica in self.replicas))
        self._polled.set()

    async def _measure(self, replica: Server, now: float) -> None:
        if not await self._connect(replica):
            return
        try:
            replayed = await asyncio.wait_for(
                replica.pool.fetchval(REPLAYED_SQL), max(self._interval, 1.0))
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as error:
            self._mark_unreachable(replica, error)
            return
        if replayed is None:  # not in recovery (a primary given as one, or promoted): as new as can be
            replica.replay, lag = self._primary_positions[-1][1], 0.0
        else:
            replica.replay = max(replica.replay, parse_lsn(replayed))
            lag = self._lag_ms(replica.replay, now)
        before = replica.state
        replica.lag_ms = lag
        replica.state = "ok" if lag <= self._max_lag_ms else "lagging"
        if replica.state != before:
            log.info("replica state", replica=replica.name, state=replica.state, lag_ms=round(lag, 1))
        REPLICA_LAG.labels(replica.name).set(lag / 1000)
        REPLICA_HEALTHY.labels(replica.name).set(1 if replica.healthy else 0)

    def _lag_ms(self, replayed: int, now: float) -> float:
        for sampled_at, position in self._primary_positions:  # oldest first
            if position > replayed:
                return (now - sampled_at) * 1000
        return 0.0

    def _mark_unreachable(self, replica: Server, error: BaseException) -> None:
        if replica.state != "unreachable":
            log.warning("replica unreachable; reads go elsewhere", replica=replica.name, error=repr(error))
        replica.state, replica.lag_ms = "unreachable", None
        REPLICA_HEALTHY.labels(replica.name).set(0)

    def describe(self) -> dict[str, str]:
        """For /readyz: each replica's state and lag."""
        return {f"replica {replica.name}": replica.state + (f", lag {replica.lag_ms:.0f} ms"
                                                            if replica.lag_ms is not None else "")
                for replica in self.replicas}
