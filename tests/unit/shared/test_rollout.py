from decimal import Decimal

import pytest

from shared.rollout import rollout_bucket, rollout_threshold


@pytest.mark.parametrize(("key", "bucket"), [
    (("AVITO_VOICE_MESSAGES", 1000), 8546),
    (("AVITO_VOICE_MESSAGES", 1002), 12),
    (("AVITO_DISCOUNT_30", 1000), 4564),
])
def test_contract_vectors(key, bucket):
    assert rollout_bucket(*key) == bucket


def test_threshold_is_percent_times_100():
    assert rollout_threshold(Decimal("0.01")) == 1
    assert rollout_threshold(Decimal("99.99")) == 9999
    assert rollout_threshold(100) == 10000
    assert rollout_threshold(0) == 0
