"""Entrypoint: python -m services.command_consumer"""

from __future__ import annotations

import asyncio
import sys

import structlog

from services.command_consumer import durability
from services.command_consumer.bootstrap import build_consumer, open_pool
from services.command_consumer.poison_guard import PoisonGuardTripped
from services.command_consumer.retry import DatabaseUnavailable
from shared.kafka import KafkaSetupError
from shared.service import bootstrap, command_line, on_shutdown_signal, serve_metrics, tune_gc

log = structlog.get_logger("command_consumer")


async def main() -> int:
    settings = bootstrap("command_consumer")
    tune_gc()
    pool = await open_pool(settings)
    serve_metrics(settings.consumer_metrics_port, settings.metrics_host)
    consumer = build_consumer(settings, pool)
    on_shutdown_signal(consumer.stop)
    watching = asyncio.create_task(durability.watch(pool, expected=settings.db_expect_synchronous_commit,
                                                    every=settings.db_durability_check_seconds))
    try:
        await consumer.run()
        return 0
    except PoisonGuardTripped as error:
        log.critical("poison guard tripped", error=str(error))
        return 3
    except DatabaseUnavailable as error:
        log.critical("database unavailable", error=str(error))
        return 4
    except KafkaSetupError as error:
        log.critical("Kafka refused the connection settings", error=str(error))
        return 2
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await pool.close()


def cli() -> None:
    command_line("command_consumer", "Consume segment and user commands from Kafka and apply them to "
                 "PostgreSQL, exactly once in effect, in per-key order.").parse_args()
    sys.exit(asyncio.run(main()))


if __name__ == "__main__":
    cli()
