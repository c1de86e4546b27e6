"""Durations and moments as people write them to the tools."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.durations import parse_duration, parse_moment


def test_durations_in_units_or_seconds():
    assert parse_duration("90s") == 90 and parse_duration("1d12h") == 129_600 and parse_duration("3600") == 3600
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_moments_are_dates_or_iso_times_utc_unless_they_say_otherwise():
    assert parse_moment("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_moment("2026-12-01T10:00:00Z") == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_moment("2026-12-01 10:00+03:00") == datetime(2026, 12, 1, 10, tzinfo=timezone(timedelta(hours=3)))
    with pytest.raises(ValueError, match=r"not a time: use e\.g\. 2026-12-01"):
        parse_moment("yesterday")
