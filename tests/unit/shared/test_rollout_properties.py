"""Properties of the percent rollout: monotonic, independent across segments, uniform."""

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.commands import MAX_USER_ID
from shared.membership import Segment, covers
from shared.rollout import rollout_bucket

slugs = st.from_regex(r"[A-Za-z0-9_.\-]{1,40}", fullmatch=True)
percents = st.decimals(min_value=0, max_value=100, places=2, allow_nan=False, allow_infinity=False)
user_ids = st.integers(min_value=1, max_value=MAX_USER_ID)


def is_covered(slug: str, user_id: int, percent) -> bool:
    return covers(Segment(1, slug, Decimal(str(percent))), user_id)


@given(slugs, user_ids, percents, percents)
def test_raising_the_percent_only_adds_users(slug, user_id, low, high):
    low, high = sorted((low, high))
    if is_covered(slug, user_id, low):
        assert is_covered(slug, user_id, high)
    if not is_covered(slug, user_id, high):
        assert not is_covered(slug, user_id, low)


@given(slugs, user_ids)
def test_zero_covers_nobody_and_hundred_covers_everybody(slug, user_id):
    assert not is_covered(slug, user_id, 0)
    assert is_covered(slug, user_id, 100)


@settings(max_examples=20, deadline=None)
@given(slugs, slugs, st.integers(min_value=10, max_value=90))
def test_segments_with_the_same_percent_select_independent_sets(first, second, percent):
    if first == second:
        return
    users = range(1, 20_001)
    a = {u for u in users if is_covered(first, u, percent)}
    b = {u for u in users if is_covered(second, u, percent)}
    share = percent / 100
    # Independent draws overlap in about share² of users; identical sets would overlap in share.
    assert abs(len(a & b) / len(users) - share * share) < 0.02
    assert a != b


@pytest.mark.parametrize("percent", ["0.01", "0.5", "10", "33.33", "50", "99.99"])
def test_covered_share_is_within_half_a_point_over_100k_users(percent):
    users = 100_000
    covered = sum(1 for u in range(1, users + 1) if is_covered("AVITO_VOICE_MESSAGES", u, Decimal(percent)))
    assert abs(covered / users * 100 - float(percent)) <= 0.5


@given(slugs, user_ids)
def test_bucket_is_deterministic_and_in_range(slug, user_id):
    bucket = rollout_bucket(slug, user_id)
    assert 0 <= bucket < 10_000
    assert bucket == rollout_bucket(slug, user_id)
