"""A batch transaction is retried while the database is away, and never skipped."""

from __future__ import annotations

import asyncpg
import pytest

from services.command_consumer import retry
from services.command_consumer.retry import DatabaseUnavailable, with_retry


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    async def instantly(seconds):
        return None

    monkeypatch.setattr(retry.asyncio, "sleep", instantly)


async def test_transient_failures_are_retried_until_the_attempt_succeeds():
    failures, told = [ConnectionRefusedError(), asyncpg.UniqueViolationError("duplicate")], []

    async def attempt():
        if failures:
            raise failures.pop(0)
        return "applied"

    result = await with_retry(attempt, attempts=5, max_backoff=0.1, where="partition t:0",
                              on_retry=lambda number, error: told.append((number, type(error).__name__)))
    assert result == "applied"
    assert told == [(1, "ConnectionRefusedError"), (2, "UniqueViolationError")]


async def test_after_the_last_attempt_the_batch_fails_as_unavailable_and_says_where():
    attempts = []

    async def attempt():
        attempts.append(1)
        raise ConnectionRefusedError()

    with pytest.raises(DatabaseUnavailable, match="partition t:0 stalled at offset 7: the database failed 3"):
        await with_retry(attempt, attempts=3, max_backoff=0.1, where="partition t:0 stalled at offset 7",
                         on_retry=lambda number, error: None)
    assert len(attempts) == 3


async def test_an_error_that_is_not_the_databases_absence_is_not_retried():
    async def attempt():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await with_retry(attempt, attempts=5, max_backoff=0.1, where="x", on_retry=lambda number, error: None)
