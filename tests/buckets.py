"""The one helper the tests use to find users by rollout bucket."""

from __future__ import annotations

import itertools

from shared.rollout import rollout_bucket


def user_in_buckets(slug: str, low: int, high: int, skip: int = 0) -> int:
    """A user id whose bucket for `slug` lies in [low, high): the first such counting from 1, or
    the one after `skip` others."""
    found = (user for user in itertools.count(1) if low <= rollout_bucket(slug, user) < high)
    return next(itertools.islice(found, skip, None))
