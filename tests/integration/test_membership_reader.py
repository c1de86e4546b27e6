"""GET /users/{id}/segments' reads: requests waiting together share one query, never an older one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.query_api.batched_lookup import BatchedLookup
from services.query_api.readmodel import USER_SEGMENTS_SQL

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC)


class CountingPool:
    """The pool, with every fetch recorded; `gate`, when set, holds answers after the query ran."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.ran = asyncio.Event()

    def get_max_size(self) -> int:
        return self.pool.get_max_size()

    async def fetch(self, query, user_ids):
        self.batches.append(list(user_ids))
        rows = await self.pool.fetch(query, user_ids)
        self.ran.set()
        if self.gate is not None:
            await self.gate.wait()
        return rows


def slugs(found) -> list[str]:
    return sorted(row[0] for row in found.rows)


async def seed(pool, users: range) -> None:
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at) VALUES ('A', $1, $1), ('B', $1, $1)", NOW)
    await pool.execute(
        """INSERT INTO memberships (user_id, segment_id, added_at)
           SELECT u, s.id, $2 FROM unnest($1::bigint[]) AS u, segments s WHERE s.slug = 'A' OR u % 2 = 0""",
        list(users), NOW)


async def test_reads_waiting_together_share_one_query_and_get_their_own_rows(pool):
    await seed(pool, range(1, 31))
    counting = CountingPool(pool)
    reader = BatchedLookup(counting, USER_SEGMENTS_SQL)
    together = await asyncio.gather(*(reader.read(user_id) for user_id in [*range(1, 31), 7]))
    assert len(counting.batches) == 1 and sorted(counting.batches[0]) == list(range(1, 31))  # 7 asked twice, read once

    one_by_one = [await reader.read(user_id) for user_id in [*range(1, 31), 7]]
    assert len(counting.batches) == 1 + 31
    assert together == one_by_one
    assert slugs(together[1]) == ["A", "B"]  # user 2
    assert slugs(together[2]) == ["A"]  # user 3
    assert (await reader.read(10_000)).rows == []  # never seen: nothing explicit
    assert all(found.shared == [(None, None, None, 0)] for found in together)  # the catalogue version, for all


async def test_a_batch_is_split_at_its_limit(pool):
    await seed(pool, range(1, 11))
    counting = CountingPool(pool)
    reader = BatchedLookup(counting, USER_SEGMENTS_SQL, max_batch=4)
    results = await asyncio.gather(*(reader.read(user_id) for user_id in range(1, 11)))
    assert sorted(len(batch) for batch in counting.batches) == [2, 4, 4]
    assert [len(found.rows) for found in results] == [1, 2] * 5


async def test_a_read_asked_for_after_a_query_ran_never_shares_its_answer(pool):
    await seed(pool, range(1, 3))
    counting = CountingPool(pool)
    counting.gate = asyncio.Event()
    reader = BatchedLookup(counting, USER_SEGMENTS_SQL)
    first = asyncio.create_task(reader.read(1))
    await counting.ran.wait()  # the first query has run; its answer is held
    await pool.execute("INSERT INTO memberships (user_id, segment_id, added_at) "
                       "SELECT 1, id, $1 FROM segments WHERE slug = 'B'", NOW)
    counting.ran.clear()
    second = asyncio.create_task(reader.read(1))
    await counting.ran.wait()  # a second query ran
    counting.gate.set()
    assert slugs(await first) == ["A"]  # as of its query
    assert slugs(await second) == ["A", "B"]  # a query of its own, after the change


async def test_a_failed_query_fails_every_read_waiting_on_it(pool):
    class BrokenPool:
        async def fetch(self, query, user_ids):
            raise ConnectionResetError("database went away")

    reader = BatchedLookup(BrokenPool(), USER_SEGMENTS_SQL, max_in_flight=4)
    results = await asyncio.gather(reader.read(1), reader.read(2), return_exceptions=True)
    assert [type(result) for result in results] == [ConnectionResetError, ConnectionResetError]


async def test_reads_wait_for_a_free_connection_together(pool):
    await seed(pool, range(1, 6))
    counting = CountingPool(pool)
    counting.gate = asyncio.Event()
    reader = BatchedLookup(counting, USER_SEGMENTS_SQL, max_in_flight=1)
    first = asyncio.create_task(reader.read(1))
    await counting.ran.wait()  # the only connection is busy
    rest = [asyncio.create_task(reader.read(user_id)) for user_id in range(2, 6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert counting.batches == [[1]]  # nothing queues for the connection...
    counting.gate.set()
    await asyncio.gather(first, *rest)
    assert counting.batches == [[1], [2, 3, 4, 5]]  # ...they all go in the next query
