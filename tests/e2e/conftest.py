"""The four services as processes on the session's broker and a fresh database, and Chromium with
the console's stack for the browser tests."""

from __future__ import annotations

import pytest

from devstack.processes import free_port
from devstack.stack import Stack
from shared.api_keys import SCOPES, new_key
from tests.browser import BROWSER_MISSING, chromium_path


@pytest.fixture
def stack(settings, tmp_path):
    """A started Stack (the four services) configured like `settings`; stopped afterwards."""
    yield from started_stack(settings, tmp_path)


@pytest.fixture
def secured_stack(settings, tmp_path):
    """The same with access control on; `stack.api_key` holds a key with every scope."""
    key, line = new_key("fuzzer", list(SCOPES))
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(line + "\n")
    for stack in started_stack(settings.model_copy(update={"api_keys_file": keys_file}), tmp_path):
        stack.api_key = key
        yield stack


def started_stack(settings, tmp_path, **env: str):
    """Stack started like `settings`, with `env` added to the services' environment."""
    settings = settings.model_copy(update={"api_port": free_port(), "data_dir": tmp_path,
                                           "consumer_metrics_port": free_port(),
                                           "expiry_metrics_port": free_port(),
                                           "publisher_metrics_port": free_port()})
    stack = Stack(settings, say=lambda *_: None)
    stack.env.update({name: value for name, value in settings.to_env().items()  # as make run, but these servers
                      if name != "DATA_DIR" and name not in Stack.SERVICE_DEFAULTS}, **env)
    try:
        stack.start_servers()  # external servers given: nothing embedded is started
        assert stack.postgres is None and stack.kafka is None
        stack.prepare()
        stack.start_services()
        stack.wait_ready()
        yield stack
    finally:
        stack.close()


TRACE_URL = "http://tracing.example/trace/{trace_id}"


@pytest.fixture
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip(BROWSER_MISSING)
    return path


@pytest.fixture
def console_stack(settings, tmp_path):
    key, line = new_key("support", list(SCOPES))
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(line + "\n")
    for stack in started_stack(settings.model_copy(update={"api_keys_file": keys_file, "ui_trace_url": TRACE_URL}),
                               tmp_path):
        stack.api_key = key
        yield stack
