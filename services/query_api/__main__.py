"""Entrypoint: python -m services.query_api"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import uvicorn

from shared.service import bootstrap, command_line


def app_factory():
    """What each uvicorn worker runs (workers are fresh processes): JSON logging, then the app."""
    from services.query_api.app import create_app
    from shared.service import tune_gc

    app = create_app(bootstrap("query_api"))
    tune_gc()
    return app


def cli() -> None:
    parser = command_line("query_api", "Serve reads, reports, command status, the command gateway and the web "
                          "console over HTTP.")
    parser.add_argument("--host", help="overrides API_HOST")
    parser.add_argument("--port", type=int, help="overrides API_PORT")
    parser.add_argument("--workers", type=int, help="overrides API_WORKERS")
    args = parser.parse_args()
    settings = bootstrap("query_api")
    settings.require_database_url()
    workers = args.workers or settings.api_workers
    if workers > 1 and not settings.prometheus_multiproc_dir:
        # Each worker is a process: metrics go through files that /metrics adds up. The workers (and
        # prometheus_client in them) read the directory from the environment they inherit.
        directory = tempfile.mkdtemp(prefix="segmentation-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # log_config=None: uvicorn's own records go through our JSON handler instead of its text format.
    uvicorn.run("services.query_api.__main__:app_factory", factory=True,
                http="services.query_api.server:HttpToolsProtocol",  # a response leaves in one write
                host=args.host or settings.api_host, port=args.port or settings.api_port,
                workers=workers, log_level="warning", log_config=None,
                access_log=False, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    cli()
