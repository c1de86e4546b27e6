"""Entrypoint: python -m services.query_api"""

from __future__ import annotations

import argparse

import uvicorn

from shared.service import bootstrap


def cli() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.query_api",
        description="Serve reads, reports, command status and the command gateway over HTTP. "
        "Configured by environment variables (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, API_HOST, API_PORT, ...).",
    )
    parser.add_argument("--host", help="overrides API_HOST")
    parser.add_argument("--port", type=int, help="overrides API_PORT")
    parser.add_argument("--workers", type=int, help="overrides API_WORKERS")
    args = parser.parse_args()
    settings = bootstrap("query_api")
    settings.require_database_url()
    uvicorn.run("services.query_api.app:create_app", factory=True,
                host=args.host or settings.api_host, port=args.port or settings.api_port,
                workers=args.workers or settings.api_workers, log_level="warning",
                access_log=False, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    cli()
