"""How segmentctl fails: one exit code for each failure a person or a script acts on differently,
and the message on stderr, every character from the wire escaped."""

from __future__ import annotations

import asyncio
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from segmentctl.output import shown
from shared.assignments import explain
from shared.client import KafkaUnavailable
from shared.kafka import KafkaSetupError

EXIT_REJECTED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_UNAUTHORIZED, EXIT_TIMED_OUT = 1, 2, 3, 4, 5
err = Console(stderr=True)


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(shown(message))}", highlight=False)  # messages quote the wire
    return typer.Exit(code)


def run_async(coroutine) -> Any:
    """The command's coroutine, its expected failures as messages and exit codes."""
    try:
        return asyncio.run(coroutine)
    except ValidationError as error:
        raise fail(f"invalid command: {explain(error)}", EXIT_BAD_INPUT) from None
    except KafkaUnavailable as error:
        raise fail(str(error), EXIT_UNAVAILABLE) from None
    except KafkaSetupError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None


def follow(coroutine) -> None:
    """`run_async` for a command that follows a stream until Ctrl-C, which ends it quietly."""
    try:
        run_async(coroutine)
    except KeyboardInterrupt:
        pass
