"""The deterministic percent-rollout bucket (README: "The contract, in short", Membership);
the rule that uses it is shared/membership.py."""

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
