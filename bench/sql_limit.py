"""The consumer's own limit: the database work its batches do, replayed straight from SQL.

A recording run (not timed) applies the commands with the real consumer through a pool whose
connections write down every statement each transaction sends, with its arguments, COPYs
included: the inbox look-up, the state loads, the writes, the inbox rows. The replay then sends
exactly those transactions, in the same batches, from as many connections at once as the
consumer had partitions in flight, to a database in the same starting state: no Kafka, no
parsing, no decisions, nothing in Python between statements but the loop that sends them.
What that takes is what the database server can do for this workload; the consumer's rate is
compared with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

Statement = tuple[str, str, tuple, dict]  # (method, sql or table, arguments, keyword arguments)


@dataclass
class Transaction:
    statements: list[Statement] = field(default_factory=list)  # inside BEGIN … COMMIT
    after: list[Statement] = field(default_factory=list)  # on the same connection after COMMIT
    committed: bool = False


class RecordingConnection:
    """An asyncpg connection that writes down what it is asked, then does it."""

    def __init__(self, conn: asyncpg.Connection, transaction: Transaction) -> None:
        self._conn = conn
        self._transaction = transaction

    @contextlib.asynccontextmanager
    async def transaction(self, **options):
        async with self._conn.transaction(**options):
            yield
        self._transaction.committed = True

    def _record(self, statement: Statement) -> None:
        recorded = self._transaction
        (recorded.after if recorded.committed else recorded.statements).append(statement)

    async def _call(self, method: str, target: str, *args, **kwargs):
        self._record((method, target, args, kwargs))
        return await getattr(self._conn, method)(target, *args, **kwargs)

    async def execute(self, sql: str, *args, **kwargs):
        return await self._call("execute", sql, *args, **kwargs)

    async def fetch(self, sql: str, *args, **kwargs):
        return await self._call("fetch", sql, *args, **kwargs)

    async def fetchrow(self, sql: str, *args, **kwargs):
        return await self._call("fetchrow", sql, *args, **kwargs)

    async def fetchval(self, sql: str, *args, **kwargs):
        return await self._call("fetchval", sql, *args, **kwargs)

    async def copy_records_to_table(self, table: str, *, records, **kwargs):
        records = list(records)
        self._record(("copy_records_to_table", table, (), {**kwargs, "records": records}))
        return await self._conn.copy_records_to_table(table, records=records, **kwargs)


class RecordingPool:
    """Hands out recording connections; `transactions` holds one entry per acquire, in order."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.transactions: list[Transaction] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[RecordingConnection]:
        transaction = Transaction()
        self.transactions.append(transaction)
        async with self._pool.acquire() as conn:
            yield RecordingConnection(conn, transaction)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def _send(conn: asyncpg.Connection, transaction: Transaction) -> None:
    async with conn.transaction():
        for method, target, args, kwargs in transaction.statements:
            await getattr(conn, method)(target, *args, **kwargs)
    for method, target, args, kwargs in transaction.after:  # the consistency token
        await getattr(conn, method)(target, *args, **kwargs)


async def replay(pool: asyncpg.Pool, transactions: list[Transaction], concurrency: int) -> float:
    """Seconds to send every recorded transaction, `concurrency` at a time, each one committed."""
    queue: asyncio.Queue[Transaction] = asyncio.Queue()
    for transaction in transactions:
        if transaction.statements:
            queue.put_nowait(transaction)

    async def lane() -> None:
        async with pool.acquire() as conn:
            while not queue.empty():
                transaction = queue.get_nowait()
                await _send(conn, transaction)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started
