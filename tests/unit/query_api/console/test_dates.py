from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.query_api.console.dates import relative, span, when

NOW = datetime(2026, 12, 6, 20, 19, 6, 483000, tzinfo=UTC)


@pytest.mark.parametrize(("offset", "words"), [
    (timedelta(seconds=-3), "just now"),
    (timedelta(seconds=-45), "45 seconds ago"),
    (timedelta(minutes=-1, seconds=-5), "1 minute ago"),
    (timedelta(minutes=-3), "3 minutes ago"),
    (timedelta(hours=-5, minutes=-59), "5 hours ago"),
    (timedelta(days=-1), "1 day ago"),
    (timedelta(days=-13), "1 week ago"),
    (timedelta(days=-65), "2 months ago"),
    (timedelta(days=-800), "2 years ago"),
    (timedelta(hours=6), "in 6 hours"),  # an expiry to come
    (timedelta(days=2, hours=1), "in 2 days"),
])
def test_the_largest_whole_unit_past_or_to_come(offset, words):
    assert relative(NOW + offset, NOW) == words


def test_a_time_element_carries_the_exact_utc_moment_for_machines_and_people():
    html = str(when("2026-12-06T20:16:06.483Z", NOW))
    assert html == ('<time datetime="2026-12-06T20:16:06.483Z" title="2026-12-06 20:16:06 UTC">'
                    '3 minutes ago</time>')
    assert str(when(None)) == "" and str(when("")) == ""
    naive = datetime(2026, 12, 6, 20, 19, 0)  # taken as UTC
    assert 'datetime="2026-12-06T20:19:00.000Z"' in str(when(naive, NOW))
    assert "16 seconds ago" in str(when("2026-12-06 20:18:50", NOW))  # a report row's text, UTC


def test_a_span_in_its_largest_whole_unit():
    assert [span(seconds) for seconds in (0, 1, 3600, 86_400 * 7, 86_400 * 30)] == [
        "0 seconds", "1 second", "1 hour", "1 week", "1 month"]
