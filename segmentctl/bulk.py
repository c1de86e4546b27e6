"""CSV import: rows of user → segment assignments become update_user_segments commands, published
in bulk with their outcomes collected.

    user_id,segment_slug[,action][,ttl]
    1000,AVITO_VOICE_MESSAGES
    1000,AVITO_DISCOUNT_30,add,2d
    1001,AVITO_DISCOUNT_30,remove

One command per row, so every row gets its own outcome. Command ids are derived from the file's
content and the line number: importing the same file again changes nothing (exactly once in effect)
and reports the stored outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.client import CommandPublisher, OutcomeReader
from shared.commands import command_adapter
from shared.durations import parse_duration
from shared.settings import Settings

REQUIRED_COLUMNS = ("user_id", "segment_slug")
ACTIONS = ("add", "remove")


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    command: dict[str, Any]


@dataclass
class ParsedFile:
    rows: list[Row] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def read_assignments(path: Path, actor: str | None = None) -> ParsedFile:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8: {error}") from error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in reader.fieldnames or ()]
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"{path}: the header must name {', '.join(REQUIRED_COLUMNS)} (optional: action, ttl); "
                         f"missing {', '.join(missing)}")
    reader.fieldnames = columns
    parsed = ParsedFile()
    for row in reader:
        line = reader.line_num
        try:
            command = _command(row, f"import-{digest}-{line}", actor)
            command_adapter.validate_python(command)
        except ValueError as error:  # includes pydantic's ValidationError
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
    """One line per problem, naming the field (pydantic's errors) or the message (others)."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'command'}: {e['msg']}" for e in error.errors())
    return str(error)


async def publish_all(settings: Settings, commands: list[dict[str, Any]], wait: bool, timeout: float,
                      console: Console) -> dict[str, dict[str, Any]]:
    """Publish every command (pipelined, in order per key) with progress bars on `console`; with
    `wait`, collect their outcomes until all have arrived or none came for `timeout` seconds."""
    found: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        published = progress.add_task("published", total=len(commands))
        processed = progress.add_task("processed", total=len(commands), visible=wait)

        def on_outcome(outcome: dict[str, Any]) -> None:
            found[outcome["command_id"]] = outcome
            progress.advance(processed)

        async with contextlib.AsyncExitStack() as stack:
            publisher = await stack.enter_async_context(CommandPublisher(settings, timeout=timeout))
            collecting = None
            if wait:  # opened before publishing, so no outcome can slip past
                outcomes = await stack.enter_async_context(OutcomeReader(settings, timeout=timeout))
                collecting = asyncio.create_task(outcomes.wait_for(
                    [command["command_id"] for command in commands], float("inf"), on_outcome))
                stack.callback(collecting.cancel)
            deliveries = []
            for command in commands:
                delivery = asyncio.ensure_future(await publisher.submit(command))
                delivery.add_done_callback(lambda _: progress.advance(published))
                deliveries.append(delivery)
            await asyncio.gather(*deliveries)
            # Outcomes keep coming while the consumer works; give up only after a quiet spell.
            while collecting is not None and not collecting.done():
                before = len(found)
                await asyncio.wait({collecting}, timeout=timeout)
                if len(found) == before:
                    break
    return found
