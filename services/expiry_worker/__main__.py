"""Entrypoint: python -m services.expiry_worker"""

from __future__ import annotations

import asyncio

from services.expiry_worker.partitions import PartitionMaintainer
from services.expiry_worker.worker import ExpiryWorker
from shared.db import create_pool
from shared.service import bootstrap, command_line, on_shutdown_signal, serve_metrics
from shared.settings import RetentionSettings


async def main() -> None:
    settings = bootstrap("expiry_worker")
    # A connection per expiry loop, one for partition maintenance, one spare.
    pool = await create_pool(settings.require_database_url(), min_size=1, max_size=settings.expiry_concurrency + 2)
    serve_metrics(settings.expiry_metrics_port, settings.metrics_host)
    worker = ExpiryWorker(pool, settings.expiry_batch_size, settings.expiry_max_sleep_seconds,
                          concurrency=settings.expiry_concurrency,
                          maintainer=PartitionMaintainer(pool, settings.section(RetentionSettings)))
    on_shutdown_signal(worker.stop)
    try:
        await worker.run()
    finally:
        await pool.close()


def cli() -> None:
    command_line("expiry_worker", "Remove explicit memberships whose expires_at has passed, recording "
                 "history, and maintain the partitions of the history and of the outcome inbox: make them "
                 "ahead, drop them past retention. Any number can run at once.").parse_args()
    asyncio.run(main())


if __name__ == "__main__":
    cli()
