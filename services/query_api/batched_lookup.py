"""Lookups by key that wait together share one query: a concurrency primitive of the hot read."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from typing import Any, NamedTuple

import asyncpg
from opentelemetry import context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

from shared import tracing


class Found(NamedTuple):
    rows: list[tuple]  # the key's rows, without the key column
    shared: list[tuple]  # rows of the query with a NULL key: the same for every key it answered


def _context_of_shared_queries() -> contextvars.Context:
    """An empty context with instrumentation suppressed: no span of any request, none of asyncpg."""
    quiet = contextvars.Context()
    quiet.run(lambda: context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, context.Context())))
    return quiet


_SHARED_QUERIES = _context_of_shared_queries()


class LookupConnection(asyncpg.Connection):
    """The connections of a BatchedLookup's pool (create_pool(..., connection_class=...)): their
    `fetch` is asyncpg's own even when tracing has wrapped asyncpg's. A lookup's query answers
    many requests and belongs to no request's trace, so it runs with instrumentation suppressed
    (_SHARED_QUERIES); the wrapper would still run on every query to find that out (a bound
    wrapper, a coroutine more, a context look-up). `python -m bench.read_instructions` counts what
    that costs a read."""

    fetch = tracing.unwrapped(asyncpg.Connection.fetch)  # asyncpg's own, whether instrumented already or later


class BatchedLookup:
    """Runs `query` ($1: an array of keys; each row's first column is its key, or NULL for a row
    every lookup of the batch gets) for all the lookups waiting together.

    At most `max_in_flight` queries run at once (by default one per connection of its pool). Reads
    asked for meanwhile wait together, and the next query, sent as soon as a connection is free
    (or at the end of the event-loop iteration when one already is), answers all of them: under
    load one round trip serves many requests and nothing queues for a connection. A query only
    ever answers reads asked for before it was sent, so no answer is older than its request:
    freshness is that of a query per request.
    """

    def __init__(self, pool: asyncpg.Pool, query: str, max_in_flight: int | None = None,
                 max_batch: int = 100) -> None:
        self._pool = pool
        self._sql = query
        self._max_in_flight = max_in_flight or pool.get_max_size()
        self._max_batch = max_batch
        self._waiting: dict[Any, list[asyncio.Future]] = {}
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()

    async def read(self, key: Any) -> Found:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._waiting and not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = {key: self._waiting.pop(key) for key in list(itertools.islice(self._waiting, self._max_batch))}
            self._in_flight += 1
            # In a context of its own: one query serves many requests and belongs to no single
            # request's trace (nor to the one that happened to schedule it), so its database
            # instrumentation is off, set once rather than entered per query.
            task = asyncio.create_task(self._query(batch), context=_SHARED_QUERIES.copy())
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _query(self, waiting: dict[Any, list[asyncio.Future]]) -> None:
        try:
            await self._answer(waiting)
        finally:
            self._in_flight -= 1
            self._schedule()

    async def _answer(self, waiting: dict[Any, list[asyncio.Future]]) -> None:
        try:
            records = await self._pool.fetch(self._sql, list(waiting))
        except Exception as error:  # each waiting request fails with it (a 500), as its own query would
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            return
        except BaseException:
            for futures in waiting.values():
                for future in futures:
                    future.cancel()
            raise
        rows: dict[Any, list[tuple]] = {key: [] for key in waiting}
        shared: list[tuple] = []
        for record in records:
            key, *values = record
            (shared if key is None else rows[key]).append(tuple(values))
        for key, futures in waiting.items():
            for future in futures:
                if not future.done():  # a request that went away no longer waits
                    future.set_result(Found(rows[key], shared))
