"""A batch of values counted into a histogram per bucket (the expiry worker's lags, the consumer's
latencies) must give what observing each value gives."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from shared.metrics import observe_all


def samples(histogram: Histogram) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in histogram.collect()
            for s in family.samples if not s.name.endswith("_created")}


def test_observe_all_equals_observing_each_value():
    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
    rng = random.Random(7)
    values = [rng.choice((0.0, 0.05, 0.1, 300.0, 301.0)) if rng.random() < 0.2 else rng.expovariate(0.5)
              for _ in range(5000)]
    one_by_one = Histogram("each", "each", buckets=buckets, registry=CollectorRegistry())
    together = Histogram("each", "each", buckets=buckets, registry=CollectorRegistry())
    for value in values:
        one_by_one.observe(value)
    observe_all(together, values)
    observe_all(together, [])
    expected, got = samples(one_by_one), samples(together)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-6 * max(1.0, value), key
