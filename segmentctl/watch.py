"""`segmentctl watch`: membership changes as they are published, in words or as JSON lines."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
import typer

from segmentctl.failures import follow
from segmentctl.output import json_text, print_lines, shown
from shared.changes import describe, encode
from shared.client import ChangeReader
from shared.durations import parse_moment


def _moment(text: str) -> datetime:
    try:
        return parse_moment(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def watch(
    ctx: typer.Context,
    segment: Annotated[str | None, typer.Option(metavar="SLUG", help="Only this segment's changes.")] = None,
    user: Annotated[int | None, typer.Option(metavar="USER_ID", min=1, help=(
        "Only this user's entries and exits, and the rollout changes whose bucket range holds its bucket."))] = None,
    since: Annotated[str | None, typer.Option("--from", metavar="TIME", help=(
        "Changes executed at or after TIME (UTC unless it says otherwise), as long as the topic keeps them. "
        "Default: from now on."))] = None,
    limit: Annotated[int | None, typer.Option(metavar="COUNT", min=1, help="Stop after this many changes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON event per line, as on the topic.")] = False,
) -> None:
    """Follow membership changes on the membership-changes topic: every entry and exit, and every
    rollout change (Ctrl-C to stop). A change published twice is shown once."""
    config = ctx.obj
    start = _moment(since) if since else None

    async def run() -> None:
        async with ChangeReader(config.settings, segment=segment, user_id=user, since=start,
                                timeout=config.timeout) as changes:
            await print_lines(changes, lambda change: json_text_of(change) if as_json else shown(describe(change)),
                              limit)

    follow(run())


def json_text_of(change) -> str:
    """The event as the topic carries it, its strings safe to print."""
    _, value, _ = encode(change)
    return json_text(orjson.loads(value))
