"""The keys in force: a broken key file keeps them, and says so once for each change of the file,
in the log and in the metric; the one rule of access."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.query_api.auth import KeyRing, authorize
from shared.api_keys import ApiKey, new_key


def failed() -> float:
    return REGISTRY.get_sample_value("segmentation_api_keys_reload_failed")


def test_a_broken_key_file_is_reported_once_per_change_and_the_old_keys_stay(tmp_path):
    key, line = new_key("reader", ["read"])
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    ring = KeyRing(path)
    path.write_text("this is not a key line\n")
    os.utime(path, ns=(1, 1))  # a change the watcher sees, whatever the clock's resolution
    with capture_logs() as logs:
        for _ in range(5):  # five ticks of the watcher
            if ring._changed():
                ring.reload()
    assert [entry["event"] for entry in logs] == ["API keys not reloaded; the keys in force stay"]
    assert ring.verify(key) is not None and ring.reload_error and failed() == 1
    path.write_text(line + "\n")
    os.utime(path, ns=(2, 2))
    with capture_logs() as logs:
        if ring._changed():
            ring.reload()
    assert ring.reload_error is None and failed() == 0


def test_authorize_is_the_one_rule():
    reader = ApiKey("r", frozenset({"read"}))
    assert authorize(reader, "read") is None and authorize(reader, None) is None
    assert authorize(reader, "write").status == 403 and "'write'" in authorize(reader, "write").message
    assert authorize(None, "read", sent=False).status == 401
    assert authorize(None, "read").invalid_key
