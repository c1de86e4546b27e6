"""What every settings section shares: read from the environment and an optional `.env`, secrets
from files too, shown without them, and handed to child processes as the variables it read."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import psutil
from pydantic import SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

S = TypeVar("S", bound="Section")
STACK_FILE = "stack.json"  # in DATA_DIR: the addresses a running `make run` chose


def _stack_file(data_dir: Path | None) -> tuple[int, dict[str, Any]] | None:
    """The launcher's pid and the settings it wrote, while that launcher is alive."""
    path = (data_dir or Path(os.environ.get("DATA_DIR") or ".data")) / STACK_FILE
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        pid = int(written["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, written.get("settings", {})) if psutil.pid_exists(pid) else None


def running_stack(data_dir: Path | None = None) -> dict[str, Any]:
    """The settings `make run` wrote for the tools of this checkout (its servers' and services'
    addresses), while the launcher that wrote them is alive; {} otherwise."""
    found = _stack_file(data_dir)
    return found[1] if found else {}


def running_launcher(data_dir: Path | None = None) -> int | None:
    """The pid of a live `make run` of this data directory, if one runs."""
    found = _stack_file(data_dir)
    return found[0] if found else None


class RunningStackSource(PydanticBaseSettingsSource):
    """The lowest-priority source: a running `make run`'s addresses. Anything the user sets (the
    environment, `.env`, arguments) wins over it."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in running_stack().items() if name in self.settings_cls.model_fields}


class Section(BaseSettings):
    """One concern's settings. Field names are the variables' names, lower-cased."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")
    title: ClassVar[str] = ""  # the heading of this section in docs/configuration.md and .env.example
    # Fields that are secrets: each can also be read from a file named by <NAME>_FILE (the Docker
    # and Kubernetes secrets convention). None of them is ever logged or shown.
    secrets: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _read_secret_files(self) -> Self:
        for name in type(self).secrets:
            path: Path | None = getattr(self, f"{name}_file", None)
            if path is None:
                continue
            variable = f"{name.upper()}_FILE"
            if name in self.model_fields_set:
                raise ValueError(f"set {name.upper()} or {variable}, not both")
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as error:
                raise ValueError(f"{variable}={path}: cannot read it ({error.strerror})") from None
            setattr(self, name, value if name == "database_url" else SecretStr(value))
            setattr(self, f"{name}_file", None)  # read once; the value is what other processes get
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, dotenv_settings, file_secret_settings, RunningStackSource(settings_cls)

    def __repr_args__(self):  # a URL's password, like the SecretStr fields, is never shown
        for name, value in super().__repr_args__():
            if name == "database_url" and value:
                value = redact(value)
            elif name == "read_database_urls":
                value = [redact(url) for url in value]
            yield name, value

    def section(self, kind: type[S]) -> S:
        """This object's values for one section: what inner code receives instead of everything."""
        return kind.model_construct(**{name: getattr(self, name) for name in kind.model_fields})

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables a service process reads (secrets included:
        for handing to a child process, never for showing)."""
        return {name.upper(): _as_env(value) for name, value in self if value is not None}


def redact(database_url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return database_url


def _as_env(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def comma_separated(value: Any) -> Any:
    """A list variable: comma-separated text, blanks dropped."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# A URL may itself hold commas (several hosts: postgresql://u@h1:5432,h2:5432/db): a list of URLs
# splits only before a scheme.
_NEXT_URL = re.compile(r"\s*,\s*(?=postgres(?:ql)?://)")


def comma_separated_urls(value: Any) -> Any:
    """A list of PostgreSQL URLs, comma-separated; each may name several hosts."""
    if isinstance(value, str):
        return [item.strip() for item in _NEXT_URL.split(value.strip().strip(",")) if item.strip()]
    return value


def empty_is_unset(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value
