"""A segment's days as an SVG chart drawn on the server: bars of entries and exits per day, a
line of the members at each day's end, axes with labels, a <title> and a <desc> that say what it
shows. The same numbers are in a table under it (the template), for screen readers and anyone
who wants them. Presentation attributes only (no style attribute): the console's CSP allows no
inline style."""

from __future__ import annotations

from markupsafe import Markup, escape

from services.query_api.console.segment_page import Day

WIDTH, HEIGHT = 720, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 64, 16, 48
ENTRY, EXIT, LINE, AXIS = "#0b4f9c", "#b35c00", "#17612f", "#4a4a4a"


def _nice(value: int) -> int:
    """The smallest of 1, 2, 5 × 10^n at least `value`: a round top for an axis."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if step * top >= value:
                return step * top
        top *= 10


def daily_chart(days: list[Day], slug: str, period: str) -> Markup:
    if not days:
        return Markup("")
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bars_top = _nice(max(max(d.entries for d in days), max(d.exits for d in days), 1))
    low = min(d.members for d in days)
    members_top = _nice(max(max(d.members for d in days), 1))
    members_low = 0 if low >= 0 else -_nice(-low)
    slot = plot_w / len(days)
    bar = max(slot * 0.4, 0.5)
    base = TOP + plot_h

    def bar_y(value: int) -> float:
        return base - plot_h * value / bars_top

    def line_y(value: int) -> float:
        return base - plot_h * (value - members_low) / (members_top - members_low)

    total_in, total_out = sum(d.entries for d in days), sum(d.exits for d in days)
    title = f"{slug}: entries, exits and members per day, {period}"
    desc = (f"From {days[0].day} to {days[-1].day}: {total_in:,} entries and {total_out:,} exits; explicit members "
            f"went from {days[0].members - days[0].entries + days[0].exits:,} to {days[-1].members:,}.")
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title chart-desc" '
             f'preserveAspectRatio="xMidYMid meet"><title id="chart-title">{escape(title)}</title>'
             f'<desc id="chart-desc">{escape(desc)}</desc>']
    # Axes and their labels: entries and exits on the left, members on the right, days below.
    parts.append(f'<g aria-hidden="true" font-size="12" fill="{AXIS}">'
                 f'<line x1="{LEFT}" y1="{base}" x2="{LEFT + plot_w}" y2="{base}" stroke="{AXIS}"/>'
                 f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="{AXIS}"/>'
                 f'<line x1="{LEFT + plot_w}" y1="{TOP}" x2="{LEFT + plot_w}" y2="{base}" stroke="{AXIS}"/>')
    for value in (0, bars_top // 2, bars_top):
        parts.append(f'<text x="{LEFT - 6}" y="{bar_y(value) + 4:.1f}" text-anchor="end">{value:,}</text>')
    for value in (members_low, (members_low + members_top) // 2, members_top):
        parts.append(f'<text x="{LEFT + plot_w + 6}" y="{line_y(value) + 4:.1f}">{value:,}</text>')
    for index in sorted({0, len(days) // 2, len(days) - 1}):
        x = LEFT + slot * (index + 0.5)
        parts.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{days[index].day:%b %d}</text>')
    parts.append(f'<text x="14" y="{TOP + plot_h / 2:.1f}" transform="rotate(-90 14 {TOP + plot_h / 2:.1f})" '
                 f'text-anchor="middle">entries and exits a day</text>'
                 f'<text x="{WIDTH - 8}" y="{TOP + plot_h / 2:.1f}" '
                 f'transform="rotate(90 {WIDTH - 8} {TOP + plot_h / 2:.1f})" text-anchor="middle">members</text>'
                 f'<text x="{LEFT}" y="{HEIGHT - 6}" fill="{ENTRY}">■ entries</text>'
                 f'<text x="{LEFT + 90}" y="{HEIGHT - 6}" fill="{EXIT}">■ exits</text>'
                 f'<text x="{LEFT + 170}" y="{HEIGHT - 6}" fill="{LINE}">— members at the day\'s end</text></g>')
    # The days: a group each, its numbers in data attributes (the browser test reads them back).
    points = []
    for index, day in enumerate(days):
        x = LEFT + slot * index + slot * 0.1
        parts.append(f'<g class="day" data-day="{day.day}" data-entries="{day.entries}" data-exits="{day.exits}" '
                     f'data-members="{day.members}" aria-hidden="true">'
                     f'<rect x="{x:.2f}" y="{bar_y(day.entries):.2f}" width="{bar:.2f}" '
                     f'height="{base - bar_y(day.entries):.2f}" fill="{ENTRY}"/>'
                     f'<rect x="{x + bar:.2f}" y="{bar_y(day.exits):.2f}" width="{bar:.2f}" '
                     f'height="{base - bar_y(day.exits):.2f}" fill="{EXIT}"/></g>')
        points.append(f"{LEFT + slot * (index + 0.5):.2f},{line_y(day.members):.2f}")
    parts.append(f'<polyline aria-hidden="true" fill="none" stroke="{LINE}" stroke-width="2" '
                 f'points="{" ".join(points)}"/></svg>')
    return Markup("".join(parts))


SPARK_W, SPARK_H = 120, 28


def sparkline(sizes: tuple[int, ...], slug: str) -> Markup:
    """A row's trend: the sizes as a line scaled to its own range, named in words (role img) as
    where it started, where it is and the change, since the line alone carries no numbers."""
    if len(sizes) < 2:
        return Markup("")
    low, high = min(sizes), max(sizes)
    span = (high - low) or 1
    step = (SPARK_W - 4) / (len(sizes) - 1)
    points = " ".join(f"{2 + step * index:.1f},{SPARK_H - 3 - (SPARK_H - 6) * (size - low) / span:.1f}"
                      for index, size in enumerate(sizes))
    change = sizes[-1] - sizes[0]
    label = (f"{slug}: explicit members over the last {len(sizes)} days, from {sizes[0]:,} to {sizes[-1]:,} "
             f"({change:+,})")
    return Markup(f'<svg class="spark" viewBox="0 0 {SPARK_W} {SPARK_H}" width="{SPARK_W}" height="{SPARK_H}" '
                  f'role="img" aria-label="{escape(label)}" data-sizes="{",".join(map(str, sizes))}">'
                  f'<polyline fill="none" stroke="{LINE}" stroke-width="1.5" points="{points}"/></svg>')
