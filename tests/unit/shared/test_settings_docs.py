"""docs/configuration.md and .env.example are generated from the settings' fields and never stale."""

from __future__ import annotations

import re
import subprocess
import sys

from shared.settings import SECTIONS, Settings
from shared.settings.__main__ import ENV_EXAMPLE, MARKDOWN, env_example, markdown


def test_the_committed_files_are_what_the_fields_generate():
    assert MARKDOWN.read_text(encoding="utf-8") == markdown(), "run `python -m shared.settings`"
    assert ENV_EXAMPLE.read_text(encoding="utf-8") == env_example(), "run `python -m shared.settings`"


def test_check_mode_fails_on_a_stale_file(tmp_path, monkeypatch):
    result = subprocess.run([sys.executable, "-m", "shared.settings", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import shared.settings.__main__ as generator

    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n")
    monkeypatch.setattr(generator, "MARKDOWN", stale)
    monkeypatch.setattr(sys, "argv", ["shared.settings", "--check"])
    try:
        generator.main()
    except SystemExit as stopped:
        assert "stale: configuration.md" in str(stopped.code)
    else:
        raise AssertionError("--check passed a stale file")


def test_every_variable_has_a_description_and_one_section():
    names = [name for section in SECTIONS for name in section.__annotations__ if name in section.model_fields]
    assert len(names) == len(set(names)), "a variable is declared in two sections"
    for section in SECTIONS:
        assert section.title
        for name in section.__annotations__:
            if name in section.model_fields:
                assert section.model_fields[name].description, name
    assert set(Settings.model_fields) <= set(names)


def test_markdown_lists_each_variable_once():
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|", markdown(), re.MULTILINE)
    assert len(rows) == len(set(rows)) and "DATABASE_URL" in rows and "SEGMENTCTL_API_URL" in rows
