"""The benchmarks' own server is left as a running server is: with WAL files to recycle, so that
no COMMIT in a timed round waits for a new WAL file to be created (bench.common.recycle_wal)."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from bench.common import recycle_wal
from devstack.embedded import EmbeddedPostgres

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(os.environ.get("DATABASE_URL") or os.environ.get("TEST_INFRA")),
                                 reason="starts an embedded PostgreSQL of its own, as the benchmarks do")]

SPARE_FILES = """SELECT count(*) FROM pg_ls_waldir()
                 WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_lsn())"""


async def test_a_fresh_server_is_left_with_wal_files_to_recycle(tmp_path):
    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        url = await asyncio.to_thread(server.start)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval(SPARE_FILES) == 0  # fresh: nothing ahead of the file in use
            await recycle_wal(url, megabytes=64)
            assert await conn.fetchval(SPARE_FILES) >= 3  # 64 MB is four 16 MB files, one in use
            assert await conn.fetchval("SHOW fsync") == "on"
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.remove)
