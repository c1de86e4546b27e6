"""What segmentctl prints of what came over the wire: anything a producer wrote (command ids, actors,
error messages) is shown with its control characters escaped, so no record can move the cursor,
clear the screen or forge a line in an operator's terminal."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterable, Callable
from typing import Any

import orjson

from shared.commands import CONTROL_CHARACTERS

# orjson escapes C0 controls inside strings already; these it leaves as they are.
_UNESCAPED_BY_JSON = re.compile("[\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]")


def shown(value: Any) -> str:
    """`value` as text, each control character written as its Python escape (ESC as \\x1b)."""
    return CONTROL_CHARACTERS.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), str(value))


def json_text(value: Any, indent: bool = False) -> str:
    """`value` as JSON whose every string is safe to print: the remaining controls as \\u escapes."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0).decode()
    return _UNESCAPED_BY_JSON.sub(lambda found: f"\\u{ord(found[0]):04x}", text)


async def print_lines(items: AsyncIterable[Any], line: Callable[[Any], str | None], limit: int | None) -> None:
    """One line for each item as it arrives (None: skipped), flushed at once; stops after `limit`."""
    printed = 0
    async for item in items:
        text = line(item)
        if text is None:
            continue
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        printed += 1
        if limit and printed >= limit:
            return
