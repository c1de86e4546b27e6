"""What every service's entrypoint does the same way: logging, metrics endpoint, signals, pool."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
from collections.abc import Callable

import structlog
from prometheus_client import start_http_server

from shared import tracing
from shared.logging import configure_logging
from shared.settings import Settings, TracingSettings, get_settings

log = structlog.get_logger(__name__)


def bootstrap(service: str) -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, service=service)
    if tracing.configure(service):
        environment = TracingSettings()
        log.info("tracing on", exporter=environment.otel_traces_exporter or "otlp",
                 sampler=environment.otel_traces_sampler or "parentbased_always_on")
    return settings


def command_line(service: str, description: str) -> argparse.ArgumentParser:
    """A service's --help: what it does, and where its settings are described."""
    return argparse.ArgumentParser(prog=f"python -m services.{service}", description=description,
                                   epilog="Configured by environment variables (or a .env file): every one is "
                                          "described in docs/configuration.md.")


def tune_gc() -> None:
    """Batches and requests allocate many short-lived objects and few cycles: keep the startup heap
    out of collections and collect the young generation less often (bench.consumer_throughput and
    bench.read_throughput run with it, as the services do)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=host)
        log.info("metrics served", url=f"http://{host}:{port}/metrics")


def on_shutdown_signal(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT ask for a graceful stop; a second one is left to the default handler."""
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        log.info("shutdown requested", signal=signal.Signals(signum).name)
        stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
