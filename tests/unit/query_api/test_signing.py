"""The signing secret: refused when public and it matters, a key of its own per purpose, and import
tokens that expire."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from itsdangerous import URLSafeTimedSerializer

from services.query_api.console.import_tokens import ImportJob, ImportTokens
from services.query_api.reports import ReportLinkInvalid, ReportSigner
from services.query_api.signing import (
    CONSOLE_SESSIONS,
    IMPORT_TOKENS,
    REPORT_LINKS,
    check_signing_secret,
    purpose_key,
)
from shared.settings import DEVELOPMENT_REPORT_SECRET, Settings


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize("secret", [DEVELOPMENT_REPORT_SECRET, "", "   "])
def test_access_control_with_a_public_or_empty_secret_refuses_to_start(tmp_path: Path, secret: str):
    keys = tmp_path / "keys"
    keys.write_text("")
    with pytest.raises(SystemExit, match="REPORT_SIGNING_SECRET") as stopped:
        check_signing_secret(settings(api_keys_file=keys, report_signing_secret=secret))
    assert "API_KEYS_FILE" in str(stopped.value)  # says why it matters here


def test_production_with_the_public_secret_refuses_to_start():
    with pytest.raises(SystemExit, match="ENVIRONMENT=production"):
        check_signing_secret(settings(environment="production", api_auth="disabled"))


def test_an_open_development_api_keeps_working_on_the_default(tmp_path: Path):
    check_signing_secret(settings())  # no keys: open anyway, a warning only
    keys = tmp_path / "keys"
    keys.write_text("")
    check_signing_secret(settings(api_keys_file=keys, report_signing_secret="our-own-long-secret"))
    check_signing_secret(settings(api_keys_file=keys, api_auth="disabled"))  # a gateway authenticates


def test_each_purpose_has_its_own_key():
    keys = {purpose_key("s", purpose) for purpose in (REPORT_LINKS, IMPORT_TOKENS, CONSOLE_SESSIONS)}
    assert len(keys) == 3 and purpose_key("s", REPORT_LINKS) != purpose_key("t", REPORT_LINKS)


def test_a_report_link_signed_with_the_bare_secret_is_refused():
    """The audit's forgery: a token minted from the public default with the link's own salt."""
    forged = URLSafeTimedSerializer(DEVELOPMENT_REPORT_SECRET, salt="history-report-v1").dumps(
        {"y": 2026, "m": 12, "u": None})
    signer = ReportSigner(purpose_key(DEVELOPMENT_REPORT_SECRET, REPORT_LINKS), 3600)
    with pytest.raises(ReportLinkInvalid):
        signer.verify(forged)
    assert signer.verify(signer.sign(2026, 12, None)) == (2026, 12, None)


def test_import_tokens_expire(monkeypatch):
    tokens = ImportTokens(purpose_key("s", IMPORT_TOKENS), max_age_seconds=60)
    token = tokens.dumps(ImportJob("abcd", [2, 3, 4], 1))
    assert tokens.loads(token) == ImportJob("abcd", [2, 3, 4], 1)
    later = time.time() + 120
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    assert tokens.loads(token) is None
