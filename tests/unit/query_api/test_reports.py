import time
from datetime import UTC, datetime

import pytest

from services.query_api.reports import ReportLinkExpired, ReportLinkInvalid, ReportSigner, month_bounds


def test_a_signed_link_round_trips():
    signer = ReportSigner("secret", 60)
    assert signer.verify(signer.sign(2026, 11, 1000)) == (2026, 11, 1000)
    assert signer.verify(signer.sign(2026, 11, None)) == (2026, 11, None)


def test_tampering_and_foreign_secrets_are_refused():
    token = ReportSigner("secret", 60).sign(2026, 11, 1000)
    with pytest.raises(ReportLinkInvalid):
        ReportSigner("secret", 60).verify(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    with pytest.raises(ReportLinkInvalid):
        ReportSigner("other", 60).verify(token)
    with pytest.raises(ReportLinkInvalid):
        ReportSigner("secret", 60).verify("../../etc/passwd")


def test_an_old_link_has_expired():
    signer = ReportSigner("secret", 1)
    token = signer.sign(2026, 11, None)
    time.sleep(2.1)
    with pytest.raises(ReportLinkExpired):
        signer.verify(token)


def test_month_bounds():
    assert month_bounds(2023, 12) == (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC))
    assert month_bounds(2023, 2)[1] == datetime(2023, 3, 1, tzinfo=UTC)
