"""The one secret the API signs with (REPORT_SIGNING_SECRET), and a key of its own for each thing
it signs, so that no token made for one purpose is ever valid for another.

What each key protects (docs/security.md): report links stand in for the `reports` scope, import
tokens name an import's commands, session cookies stand in for an API key, and CSRF tokens bind
a form to its session. Anyone who knows the secret can mint all four, so a deployment with access
control must never run on the built-in development value.
"""

from __future__ import annotations

import hashlib
import hmac

import structlog

from shared.settings import DEVELOPMENT_REPORT_SECRET, ApiSettings

log = structlog.get_logger("query_api")

REPORT_LINKS = "history-report-v1"
IMPORT_TOKENS = "console-import-v1"
CONSOLE_SESSIONS = "console-session-v1"
CONSOLE_CSRF = "console-csrf-v1"


def purpose_key(secret: str, purpose: str) -> bytes:
    """The key for one purpose, derived from the deployment's secret (HMAC-SHA256 with the purpose
    as the message, so the keys are independent however the secret is chosen)."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def access_control_on(settings: ApiSettings) -> bool:
    return settings.api_auth == "enabled" and settings.api_keys_file is not None


def check_signing_secret(settings: ApiSettings) -> None:
    """Refuse to start when signed tokens could be forged: with access control on, or in production,
    the secret must be one of the deployment's own. Without keys in development the API is open
    anyway, so the public default only costs a warning."""
    secret = settings.report_signing_secret.get_secret_value()
    public = not secret.strip() or secret == DEVELOPMENT_REPORT_SECRET
    if not public:
        return
    if settings.environment == "production" or access_control_on(settings):
        why = "ENVIRONMENT=production" if settings.environment == "production" else "access control (API_KEYS_FILE)"
        raise SystemExit(f"REPORT_SIGNING_SECRET is unset or the public development value, and {why} is on: "
                         "anyone could forge report links and console sessions. Set REPORT_SIGNING_SECRET (or "
                         "REPORT_SIGNING_SECRET_FILE) to a long random secret of your own, the same on every "
                         "API replica, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    log.warning("report links and console tokens are signed with the public development secret; that is "
                "only safe while the API is open to everyone (no API_KEYS_FILE). Set REPORT_SIGNING_SECRET "
                "before turning access control on")
