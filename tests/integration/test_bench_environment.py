"""The benchmarks' own servers: the primary is left as a running server is, with WAL files to
recycle, so that no COMMIT in a timed round waits for a new WAL file to be created
(bench.common.recycle_wal); a replica a benchmark starts leaves nothing behind, and its lag
behind the primary is seen while it falls behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from types import SimpleNamespace

import asyncpg
import pytest

from bench.common import recycle_wal, start_replica
from bench.scale.commands import peak_replica_lag
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


async def test_a_benchmark_replica_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    primary = EmbeddedPostgres(tmp_path / "primary" / "postgres")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the benchmark's mkdtemp makes its directory
    try:
        url = await asyncio.to_thread(primary.start)
        writer = await asyncpg.connect(url)
        stopped = asyncio.Event()
        stopped.set()  # one look
        try:
            assert await peak_replica_lag(writer, stopped) is None  # no replica yet
            async with contextlib.AsyncExitStack() as cleanup:
                replica_url = await start_replica(SimpleNamespace(postgres=primary),
                                                  SimpleNamespace(database_url=url), cleanup)
                conn = await asyncpg.connect(replica_url)
                try:
                    assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
                    # Replay paused, the replica falls behind by what the primary writes meanwhile.
                    await conn.execute("SELECT pg_wal_replay_pause()")
                    await writer.execute("CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad "
                                         "FROM generate_series(1, 200000) AS g")
                    stop = asyncio.Event()
                    looking = asyncio.create_task(peak_replica_lag(writer, stop))
                    await asyncio.sleep(1)
                    stop.set()
                    assert (await looking)["replica lag MiB"] > 20
                    await conn.execute("SELECT pg_wal_replay_resume()")
                finally:
                    await conn.close()
                assert [path.name[:len("bench-replica-")] for path in scratch.iterdir()] == ["bench-replica-"]
            assert list(scratch.iterdir()) == []
        finally:
            await writer.close()
    finally:
        await asyncio.to_thread(primary.remove)
