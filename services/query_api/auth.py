"""The API keys in force (README: "Access control"), from API_KEYS_FILE (format: shared/api_keys.py).

Clients send `Authorization: Bearer <key>`. The file is read again when it changes (checked every
second) or on SIGHUP, so a key is revoked without a restart; a file that no longer parses keeps
the keys in force and says why, once for each change of the file, in the log, in /readyz and in
the metric segmentation_api_keys_reload_failed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import Gauge

from shared.api_keys import ApiKey, KeyFileError, key_hash, parse_keys

log = structlog.get_logger("query_api")
RELOAD_FAILED = Gauge("segmentation_api_keys_reload_failed",
                      "1 while the API keys file's last change could not be read (the keys before it stay in force)",
                      multiprocess_mode="max")


class KeyRing:
    """The keys in force. With no file, authentication is off and every caller may do anything."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._keys: dict[str, ApiKey] = {}
        self._known: dict[str, ApiKey] = {}  # keys already verified, by the key itself: no hash per request
        self._seen: tuple[int, int] | None = None  # the file's (mtime_ns, size) when last read
        self._watcher: asyncio.Task | None = None
        self.reload_error: str | None = None  # why the file's last change was not taken, if it was not
        if path is not None:
            self._keys = self._read()
            RELOAD_FAILED.set(0)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def verify(self, key: str) -> ApiKey | None:
        found = self._known.get(key)
        if found is None:
            found = self._keys.get(key_hash(key))
            if found is not None and len(self._known) < 10_000:  # only valid keys: nobody can fill it
                self._known[key] = found
        return found

    def by_hash(self, digest: str) -> ApiKey | None:
        """The key in force whose SHA-256 is `digest` (the console's session names its key so)."""
        return self._keys.get(digest)

    def reload(self) -> None:
        """Read the file again; on an error keep the keys in force. A file that fails is not read
        again until it changes, so its error is reported once."""
        try:
            keys = self._read()
        except (OSError, KeyFileError) as error:
            self.reload_error = str(error)
            RELOAD_FAILED.set(1)
            log.error("API keys not reloaded; the keys in force stay", file=str(self.path), error=str(error))
            return
        self.reload_error = None
        RELOAD_FAILED.set(0)
        if keys != self._keys:
            log.info("API keys reloaded", file=str(self.path), keys=len(keys))
        self._keys, self._known = keys, {}

    def _read(self) -> dict[str, ApiKey]:
        self._seen = self._stamp()  # this version of the file, read once whether it parses or not
        return parse_keys(self.path.read_text(encoding="utf-8"))

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size)

    def _changed(self) -> bool:
        return self._stamp() != self._seen

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the file changes, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self._changed():
                self.reload()

    def start(self) -> None:
        if self.enabled:
            self._watcher = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a caller may not do something: 401 (no valid key) or 403 (a key without the scope)."""

    status: int
    message: str
    invalid_key: bool = False  # a key was sent, but it is unknown or revoked


def authorize(key: ApiKey | None, scope: str | None, *, sent: bool = True) -> Denial | None:
    """The one rule of access: None when `key` may do what `scope` names (any valid key for None),
    else the Denial. `key` is the verified key (None: none, or not valid); `sent` whether a key was
    offered at all. The API routes, the hot read's fast path and the console all ask here."""
    if key is None:
        if not sent:
            return Denial(401, "an API key is needed: send Authorization: Bearer <key>")
        return Denial(401, "this API key is not valid (unknown or revoked)", invalid_key=True)
    if scope is not None and scope not in key.scopes:
        return Denial(403, f"the key {key.name!r} does not have the scope {scope!r} this needs")
    return None


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
