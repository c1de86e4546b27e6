"""The three services as processes on the session's broker and a fresh database."""

from __future__ import annotations

import pytest

from devstack.processes import free_port
from devstack.stack import Stack


@pytest.fixture
def stack(settings, tmp_path):
    """A started Stack (consumer, API, expiry worker) configured like `settings`; stopped afterwards."""
    settings = settings.model_copy(update={"api_port": free_port(), "data_dir": tmp_path,
                                           "consumer_metrics_port": free_port(),
                                           "expiry_metrics_port": free_port()})
    stack = Stack(settings, say=lambda *_: None)
    stack.env.update({key.upper(): str(value) for key, value in settings.model_dump().items()
                      if value is not None and key != "data_dir"})
    try:
        stack.start_servers()  # external servers given: nothing embedded is started
        assert stack.postgres is None and stack.kafka is None
        stack.prepare()
        stack.start_services()
        stack.wait_ready()
        yield stack
    finally:
        stack.close()
