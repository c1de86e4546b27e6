"""The one backoff every database retry uses (consumer batches, partition leases, expiry worker)."""

from shared.db import Backoff


def test_waits_double_from_a_tenth_of_a_second_up_to_the_cap_with_jitter_and_reset():
    backoff = Backoff(cap=1.0)
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for base in bases:
        assert base * 0.5 <= backoff.next() <= base * 1.5
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.15
