"""Entrypoint: python -m services.change_publisher [replay --from TIME]"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from datetime import UTC, datetime

import asyncpg

from services.change_publisher.publisher import ChangePublisher
from services.change_publisher.replay import replay
from shared.durations import parse_moment
from shared.kafka import create_producer, start_client
from shared.service import bootstrap, command_line, on_shutdown_signal, serve_metrics, tune_gc
from shared.settings import KafkaSettings, get_settings


async def publish() -> None:
    settings = bootstrap("change_publisher")
    producer = create_producer(settings.section(KafkaSettings))
    await start_client(producer, settings.section(KafkaSettings))
    serve_metrics(settings.publisher_metrics_port, settings.metrics_host)
    tune_gc()
    # Publishing yields the CPU to applying changes: it catches up after a burst (its lag is
    # what the alerts watch), where competing would slow every writer on a shared host.
    if settings.publisher_nice:
        os.nice(settings.publisher_nice)
    publisher = ChangePublisher(
        functools.partial(asyncpg.connect, settings.require_database_url(), command_timeout=60),
        producer, settings.membership_changes_topic, batch_size=settings.publisher_batch_size,
        poll_interval=settings.publisher_poll_interval_seconds,
        standby_retry=settings.publisher_standby_retry_seconds)
    on_shutdown_signal(publisher.stop)
    try:
        await publisher.run()
    finally:
        await producer.stop()


async def queue_replay(start: datetime, end: datetime) -> None:
    from rich.progress import Progress

    settings = get_settings()
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        with Progress(transient=False) as progress:
            task = progress.add_task("queueing changes", total=None)
            total = await replay(conn, start, end,
                                 lambda done, total: progress.update(task, completed=done, total=total))
    finally:
        await conn.close()
    print(f"{total} changes from {start.isoformat()} to {end.isoformat()} queued; "
          "the publisher sends them before anything newer.")


def moment(text: str) -> datetime:
    try:
        return parse_moment(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cli(argv: list[str] | None = None) -> None:
    parser = command_line(
        "change_publisher",
        "Publish every membership change (entries, exits, rollout changes) to the membership-changes topic, "
        "from the outbox the database fills in the same transaction as each change. One instance is active at "
        "a time; others stand by.")
    commands = parser.add_subparsers(dest="command", metavar="{run,replay}")
    commands.add_parser("run", help="publish (the default)")
    again = commands.add_parser(
        "replay", help="queue the changes recorded from a point in time, to publish them first",
        description="Queue the history and rollout changes recorded in [--from, --until) for publication ahead of "
                    "everything waiting: for a new deployment on old data (migrate, replay, start the publisher).")
    again.add_argument("--from", dest="start", type=moment, required=True, metavar="TIME",
                       help="UTC unless it says otherwise, e.g. 2026-11-01 or 2026-11-01T10:00:00Z")
    again.add_argument("--until", dest="end", type=moment, default=None, metavar="TIME", help="default: now")
    args = parser.parse_args(argv)
    if args.command == "replay":
        end = args.end or datetime.now(UTC)
        if end <= args.start:
            parser.error("--until must be after --from")
        asyncio.run(queue_replay(args.start, end))
    else:
        asyncio.run(publish())


if __name__ == "__main__":
    cli(sys.argv[1:])
