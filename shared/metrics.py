"""Helpers for the services' Prometheus metrics."""

from __future__ import annotations

import bisect
import math

from prometheus_client import Histogram


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for every value, counted per bucket first: a batch has thousands of
    values, and observe() takes a lock and walks the buckets for each. Uses the client's bucket
    counters directly (prometheus_client keeps them in `_buckets`, `_sum`)."""
    buckets, total = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or total is None or bounds is None:  # another client version: one by one
        for value in values:
            histogram.observe(value)
        return
    ordered = sorted(values)
    below = 0
    for index, bound in enumerate(bounds):
        upto = bisect.bisect_right(ordered, bound)
        if upto > below:
            buckets[index].inc(upto - below)
            below = upto
    total.inc(math.fsum(ordered))
