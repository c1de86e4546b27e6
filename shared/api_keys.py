"""API keys: their scopes and the API_KEYS_FILE format, shared by the query API (which checks keys)
and segmentctl (which makes them).

One key per line, `<name>:<scope>[,<scope>…]:<sha256 of the key, hex>`; `#` starts a comment. The
file never holds a key itself.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

SCOPES = ("read", "reports", "write", "status")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scopes: frozenset[str]


class KeyFileError(ValueError):
    pass


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str, scopes: list[str]) -> tuple[str, str]:
    """A fresh key and the API_KEYS_FILE line that grants it `scopes` under `name`."""
    line = f"{name}:{','.join(scopes)}:"
    parse_line(line + "0" * 64, 1)  # the name and scopes are valid
    key = secrets.token_urlsafe(32)
    return key, line + key_hash(key)


def parse_line(line: str, number: int) -> tuple[str, ApiKey] | None:
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3:
        raise KeyFileError(f"line {number}: expected <name>:<scope>[,<scope>…]:<sha256 hex>")
    name, scopes, digest = (part.strip() for part in parts)
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"line {number}: a key's name is 1-128 letters, digits and _ . @ -, first a "
                           f"letter or digit")
    granted = frozenset(scope.strip() for scope in scopes.split(","))
    unknown = sorted(granted - set(SCOPES))
    if unknown:
        raise KeyFileError(f"line {number}: unknown scope {', '.join(unknown)}; scopes are {', '.join(SCOPES)}")
    if not _HASH.fullmatch(digest.lower()):
        raise KeyFileError(f"line {number}: the third field is the key's SHA-256 as 64 hex digits, not the key")
    return digest.lower(), ApiKey(name, granted)


def parse_keys(text: str) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    for number, line in enumerate(text.splitlines(), 1):
        parsed = parse_line(line, number)
        if parsed:
            keys[parsed[0]] = parsed[1]
    return keys
