"""Writes docs/configuration.md and .env.example from the settings' fields, so neither drifts from
the code (a test fails when either is stale).

    python -m shared.settings            # write both
    python -m shared.settings --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from shared.settings import SECTIONS

ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
GENERATED = "Generated from `shared/settings/sections.py` by `python -m shared.settings`; do not edit by hand."


def _default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def own_fields(section) -> list[tuple[str, Any]]:
    """The fields a section declares itself, in their order."""
    own = section.__annotations__
    return [(name.upper(), field) for name, field in section.model_fields.items() if name in own]


def markdown() -> str:
    lines = ["# Configuration", "", f"Every variable the project reads, by section. {GENERATED}", "",
             "Each is read from the environment, or from a `.env` file in the working directory "
             "(`.env.example` lists them all). Durations take `90s`, `15m`, `2h`, `7d`, `1w` or seconds.", ""]
    for section in SECTIONS:
        lines += [f"## {section.title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for variable, field in own_fields(section):
            default = _default(field.default if field.default_factory is None else field.default_factory())
            shown = f"`{default}`" if default else "unset"
            meaning = field.description.replace("|", "\\|")
            lines.append(f"| `{variable}` | {shown} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def env_example() -> str:
    lines = [f"# Every variable the project reads. {GENERATED}",
             "# Copy to .env and uncomment what you change. Secrets can instead come from files: <NAME>_FILE.", ""]
    for section in SECTIONS:
        lines.append(f"# --- {section.title} " + "-" * max(3, 96 - len(section.title)))
        for variable, field in own_fields(section):
            lines += textwrap.wrap(field.description, 98, initial_indent="# ", subsequent_indent="# ")
            default = _default(field.default if field.default_factory is None else field.default_factory())
            lines.append(f"# {variable}={default}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md and .env.example from the settings.")
    parser.add_argument("--check", action="store_true", help="only check that both are up to date")
    arguments = parser.parse_args()
    stale = []
    for path, text in ((MARKDOWN, markdown()), (ENV_EXAMPLE, env_example())):
        if arguments.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        sys.exit(f"stale: {', '.join(stale)}; run `python -m shared.settings`")


if __name__ == "__main__":
    main()
