"""CSV import from a terminal: a file of assignments (format: shared/assignments.py) published in
bulk, with progress bars and its outcomes collected."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.assignments import ParsedFile, parse_assignments
from shared.client import CommandPublisher, OutcomeReader
from shared.settings import KafkaSettings


def read_assignments(path: Path, actor: str | None = None) -> ParsedFile:
    """The file at `path` parsed (shared/assignments.py); ValueError names the file."""
    try:
        return parse_assignments(path.read_bytes(), actor)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


async def publish_all(settings: KafkaSettings, commands: list[dict[str, Any]], wait: bool, timeout: float,
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
