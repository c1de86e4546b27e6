"""A batch transaction retried while the database is unavailable: the partition stalls, it never
skips a command (README: Delivery)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from shared.db import TRANSIENT_DB_ERRORS, Backoff

T = TypeVar("T")

# A unique violation of the inbox means another consumer (a zombie after a rebalance) stored the
# same command meanwhile: the retry finds its outcome and applies nothing.
RETRIED_ERRORS = (*TRANSIENT_DB_ERRORS, asyncpg.UniqueViolationError)


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable through every retry; nothing of the batch was committed."""


async def with_retry(attempt: Callable[[], Awaitable[T]], *, attempts: int, max_backoff: float, where: str,
                     on_retry: Callable[[int, BaseException], None]) -> T:
    """Run `attempt` until it succeeds, at most `attempts` times, with jittered exponential backoff
    capped at `max_backoff` seconds; `on_retry(number, error)` is told of each failure."""
    backoff = Backoff(max_backoff)
    for number in range(1, attempts + 1):
        try:
            return await attempt()
        except RETRIED_ERRORS as error:
            on_retry(number, error)
            await asyncio.sleep(backoff.next())
    raise DatabaseUnavailable(
        f"{where}: the database failed {attempts} attempts; nothing of it was committed"
    )
