"""The deterministic percent-rollout bucket (CONTRACT: membership semantics)."""

from __future__ import annotations

from decimal import Decimal

import mmh3

BUCKETS = 10_000


def rollout_bucket(slug: str, user_id: int) -> int:
    """murmur3_x86_32("<slug>:<user_id>", seed 0) as unsigned, mod 10000."""
    return mmh3.hash(f"{slug}:{user_id}", 0, signed=False) % BUCKETS


def rollout_threshold(percent: Decimal | float | int) -> int:
    """Buckets below this number are covered; percent has at most two decimals."""
    return int((Decimal(str(percent)) * 100).to_integral_value())


def is_covered(slug: str, user_id: int, percent: Decimal | float | int) -> bool:
    threshold = rollout_threshold(percent)
    return threshold > 0 and rollout_bucket(slug, user_id) < threshold
