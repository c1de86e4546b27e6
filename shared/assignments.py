"""The bulk-import CSV format of user → segment assignments, shared by `segmentctl import` and the
web console's import page: each row becomes one update_user_segments command.

    user_id,segment_slug[,action][,ttl]
    1000,AVITO_VOICE_MESSAGES
    1000,AVITO_DISCOUNT_30,add,2d
    1001,AVITO_DISCOUNT_30,remove

One command per row, so every row gets its own outcome. Command ids are derived from the file's
content and the line number: importing the same file again changes nothing (exactly once in effect)
and reports the stored outcomes.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shared.commands import command_adapter
from shared.durations import parse_duration
from shared.validation import sentence

REQUIRED_COLUMNS = ("user_id", "segment_slug")
ACTIONS = ("add", "remove")


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    command: dict[str, Any]


@dataclass
class ParsedFile:
    digest: str
    rows: list[Row] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # the first invalid rows, with their reasons
    invalid: int = 0  # every invalid row, listed or not


def file_digest(data: bytes) -> str:
    """What a file's command ids start from: the same content gives the same ids."""
    return hashlib.sha256(data).hexdigest()[:16]


def command_id(digest: str, line: int) -> str:
    return f"import-{digest}-{line}"


def parse_assignments(data: bytes, actor: str | None = None, errors_listed: int | None = None) -> ParsedFile:
    """The file's rows as validated commands, and its invalid rows by line number (the first
    `errors_listed` of them with their reasons, all of them counted). ValueError when the file as a
    whole cannot be read (not UTF-8, a header without the required columns)."""
    digest = file_digest(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"the file is not UTF-8: {error}") from error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in reader.fieldnames or ()]
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"the header must name {', '.join(REQUIRED_COLUMNS)} (optional: action, ttl); "
                         f"missing {', '.join(missing)}")
    reader.fieldnames = columns
    parsed = ParsedFile(digest)
    for row in reader:
        line = reader.line_num
        try:
            command = _command(row, command_id(digest, line), actor)
            command_adapter.validate_python(command)
        except ValueError as error:  # includes pydantic's ValidationError
            parsed.invalid += 1
            if errors_listed is None or len(parsed.errors) < errors_listed:
                parsed.errors.append((line, explain(error)))
            continue
        parsed.rows.append(Row(line, command))
    return parsed


def _command(row: dict[str, str | None], command_id: str, actor: str | None) -> dict[str, Any]:
    user_id = (row.get("user_id") or "").strip()
    if not user_id.isdigit():
        raise ValueError(f"user_id {user_id!r} is not a positive integer")
    slug = (row.get("segment_slug") or "").strip()
    action = (row.get("action") or "add").strip().lower()
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    command: dict[str, Any] = {"type": "update_user_segments", "command_id": command_id, "user_id": int(user_id),
                               action: [slug]}
    ttl = (row.get("ttl") or "").strip()
    if ttl:
        if action == "remove":
            raise ValueError("a ttl only applies to add")
        command["ttl_seconds"] = parse_duration(ttl)
    if actor:
        command["actor"] = actor
    return command


def explain(error: ValueError) -> str:
    """A row's problems in words, naming the file's column where a command field came from one."""
    if isinstance(error, ValidationError):
        text = sentence(error)
        for field in ("add[0]", "remove[0]"):
            text = text.replace(f"{field}: ", "segment_slug: ")
        return text
    return str(error)
