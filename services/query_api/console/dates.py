"""Times as a person reads them: "3 minutes ago", "in 2 days", with the exact moment in UTC
behind it (a <time> element; console.js adds the viewer's own time zone to its tooltip)."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup, escape

from shared.outcomes import format_timestamp

_UNITS = ((86_400 * 365, "year"), (86_400 * 30, "month"), (86_400 * 7, "week"), (86_400, "day"),
          (3600, "hour"), (60, "minute"), (1, "second"))


def moment_of(value: datetime | str) -> datetime:
    """A datetime, or the text the report rows and outcomes carry; without an offset it is UTC."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def span(seconds: float) -> str:
    """A length of time in its largest whole unit: "45 seconds", "1 hour", "7 days"."""
    for size, unit in _UNITS:
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return "0 seconds"


def relative(moment: datetime, now: datetime) -> str:
    """The distance from `now` in its largest whole unit: "just now", "5 minutes ago", "in 2 days"."""
    seconds = (moment - now).total_seconds()
    if abs(seconds) < 10:
        return "just now"
    return f"in {span(seconds)}" if seconds > 0 else f"{span(-seconds)} ago"


def exact(moment: datetime) -> str:
    """The moment in UTC to the second, as a tooltip says it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(value: datetime | str | None, now: datetime | None = None) -> Markup:
    """A <time> element: relative text, the exact UTC moment as its tooltip and machine value."""
    if value is None or value == "":
        return Markup("")
    moment = moment_of(value)
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        format_timestamp(moment), exact(moment), escape(relative(moment, now or datetime.now(UTC))))
