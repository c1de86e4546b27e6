"""Human durations (TTLs, retention windows): `90s`, `15m`, `2h`, `2d`, `1w`, `1d12h`, or plain seconds;
and moments as the tools take them: a date or an ISO time, UTC unless it says otherwise."""

from __future__ import annotations

import re
from datetime import UTC, datetime

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> int:
    """Seconds in `text`; ValueError with what is accepted when it cannot be read."""
    text = text.strip().lower()
    if text.isdigit():
        seconds = int(text)
    elif text and _PART.sub("", text) == "":
        seconds = sum(int(number) * UNITS[unit] for number, unit in _PART.findall(text))
    else:
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 15m, 2h, 2d, 1w, 1d12h or plain seconds")
    if seconds < 1:
        raise ValueError("a duration must be at least 1 second")
    return seconds


def format_duration(seconds: int) -> str:
    """`seconds` as parse_duration reads it back, largest units first: 604800 -> `1w`, 90 -> `1m30s`."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in sorted(UNITS.items(), key=lambda item: -item[1]):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_moment(text: str) -> datetime:
    """`2026-12-01`, `2026-12-01T10:00:00Z`, `2026-12-01 10:00+03:00`: an aware time (UTC when
    `text` names no offset); ValueError saying what is accepted when it cannot be read."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use e.g. 2026-12-01 or 2026-12-01T10:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
