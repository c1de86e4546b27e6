"""`python -m devstack`: run the whole system on embedded defaults (what `make run` calls)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from devstack.embedded import EmbeddedPostgres
from devstack.stack import SERVICES, Stack
from shared.db import apply_migrations
from shared.kafka import ensure_topics
from shared.settings import get_settings
from shared.settings.base import running_launcher

RESTART_LIMIT = 5


def run(stack: Stack) -> int:
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stack.start_servers()
        stack.prepare()
        stack.write_stack_file()
        stack.start_services()
        stack.wait_ready()
        print(stack.summary(), flush=True)
        restarts = dict.fromkeys(SERVICES, 0)
        while not stopping:
            time.sleep(0.2)
            for name, process in list(stack.services.items()):
                if process.poll() is not None and not stopping:
                    restarts[name] += 1
                    if restarts[name] > RESTART_LIMIT:
                        print(f"{name} keeps exiting (status {process.returncode}); stopping. "
                              f"See {stack.log_dir / (name + '.log')}", file=sys.stderr)
                        return 1
                    print(f"{name} exited with status {process.returncode}; restarting", file=sys.stderr)
                    stack.start_service(name)
        return 0
    finally:
        print("stopping…", flush=True)
        stack.close()
        print("stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=(
        "Run the user segmentation service locally: an embedded Kafka-protocol broker and PostgreSQL "
        "(unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set), migrations, topics, and the command "
        "consumer, query API and expiry worker. Ctrl-C stops everything it started."))
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="start everything (default)")
    sub.add_parser("migrate", help="apply pending migrations to DATABASE_URL (or the embedded database)")
    sub.add_parser("provision", help="apply migrations and create the topics on DATABASE_URL and "
                   "KAFKA_BOOTSTRAP_SERVERS (the one-shot job of a deployment)")
    sub.add_parser("clean", help="stop the embedded PostgreSQL of DATA_DIR and delete its data, wherever it "
                   "keeps it (as root: under EMBEDDED_POSTGRES_ROOT_DIR); what `make clean` calls")
    args = parser.parse_args()
    if args.command in (None, "run", "clean") and (launcher := running_launcher()) is not None:
        # Two launchers on one data directory would share its PostgreSQL data; clean would delete it.
        raise SystemExit(f"`make run` is already running from this checkout (PID {launcher}); stop it first "
                         "(Ctrl-C in its terminal), or set DATA_DIR to run another stack beside it.")
    settings = get_settings()
    if args.command == "clean":
        postgres = EmbeddedPostgres(settings.data_dir / "postgres")
        if postgres.remove():
            print(f"removed the embedded PostgreSQL data in {postgres.data_dir}")
        else:
            print(f"no embedded PostgreSQL data to remove (looked in {postgres.data_dir})")
        return
    if args.command == "provision":
        applied = apply_migrations(settings.require_database_url())
        created = asyncio.run(ensure_topics(settings))
        print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}; "
              f"topics created: {', '.join(created) or 'none (present)'}")
        return
    if args.command == "migrate":
        if settings.database_url:
            applied = apply_migrations(settings.database_url)
        else:
            stack = Stack(settings)
            try:
                stack.start_servers(kafka=False, services=False)
                applied = apply_migrations(stack.env["DATABASE_URL"])
            finally:
                stack.close()
        print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
        return
    sys.exit(run(Stack(settings)))


if __name__ == "__main__":
    main()
