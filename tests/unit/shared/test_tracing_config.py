"""Which instrumentations tracing installs: all of them, less those the standard
OTEL_PYTHON_DISABLED_INSTRUMENTATIONS names."""

from __future__ import annotations

import aiokafka
import asyncpg
import pytest
from opentelemetry import trace

from services.query_api.app import create_app
from shared import tracing
from shared.settings import Settings


def wrapped(function) -> bool:
    return tracing.unwrapped(function) is not function


@pytest.fixture
def tracing_on(monkeypatch):
    """Tracing enabled on the current global provider (setting another would stick for the session)."""

    def enable(disabled: str) -> None:
        monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", disabled)
        tracing.enable(trace.get_tracer_provider())

    yield enable
    tracing.disable()


def test_every_instrumentation_when_none_is_disabled(tracing_on):
    tracing_on("")
    assert wrapped(asyncpg.Connection.fetch) and wrapped(aiokafka.AIOKafkaProducer.send)
    assert create_app(Settings(_env_file=None)).traces_requests  # the API's request spans
    tracing.disable()
    assert not wrapped(asyncpg.Connection.fetch) and not wrapped(aiokafka.AIOKafkaProducer.send)


@pytest.mark.parametrize("disabled", ["asyncpg", " AsyncPG ,fastapi", "asgi,aiokafka"])
def test_the_instrumentations_named_are_not_installed(tracing_on, disabled):
    tracing_on(disabled)
    names = {name.strip().lower() for name in disabled.split(",")}
    assert wrapped(asyncpg.Connection.fetch) == ("asyncpg" not in names)
    assert wrapped(aiokafka.AIOKafkaProducer.send) == ("aiokafka" not in names)
    assert create_app(Settings(_env_file=None)).traces_requests == (not names & {"asgi", "fastapi"})
    assert tracing.ENABLED
