"""Headless Chromium for the console's browser tests: Debian's package (`apt-get install chromium`,
which .ci/run does), driven by Playwright. Playwright never downloads a browser here.

Without Chromium the browser tests are skipped with BROWSER_MISSING, and the session's summary
says so plainly (tests/conftest.py): they never pass silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
BROWSER_MISSING = ("no Chromium: the web console's browser tests need Debian's chromium package "
                   "(apt-get install chromium) or CHROMIUM_PATH pointing at a Chromium binary")
# The flags a closed network and root need: no sandbox (root), no calls home that a closed network
# refuses by the dozen, no GPU.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    given = os.environ.get("CHROMIUM_PATH")
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def artifacts_dir(name: str) -> Path:
    """Where a test keeps what it leaves for people to look at (TEST_ARTIFACTS_DIR, else
    test-artifacts/ in the checkout, which git ignores)."""
    root = Path(os.environ.get("TEST_ARTIFACTS_DIR") or CHECKOUT / "test-artifacts")
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path
