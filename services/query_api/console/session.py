"""The console's sessions and CSRF tokens, with no session store.

Signing in with an API key sets a signed, timestamped cookie (itsdangerous) that names the key by
its SHA-256, never the key itself. Every request looks that hash up among the keys in force, so a
revoked key ends its sessions at once, on every API worker. The cookie is HttpOnly,
SameSite=Strict, limited to /ui, and Secure when the console is reached over HTTPS.

Each session also holds a random nonce; a state-changing form carries an HMAC of it (the CSRF
token), and a POST whose token does not match is refused. Signing in and out start a new nonce,
so a token seen before signing in is worthless after.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from services.query_api.auth import KeyRing
from shared.api_keys import SCOPES, ApiKey, key_hash

COOKIE = "segmentation_console"
COOKIE_PATH = "/ui"
OPEN_ACTOR = "console"  # who the console's commands come from when access control is off


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who is looking: the key signed in (None if nobody), its scopes, and the session's nonce."""

    key: ApiKey | None
    nonce: str
    csrf_token: str
    access_control: bool
    cookie: str | None  # a cookie to set with the response (a new or renewed session), else None

    @property
    def signed_in(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        return self.key.name if self.key else OPEN_ACTOR

    def can(self, scope: str) -> bool:
        return self.key is not None and scope in self.key.scopes


class Sessions:
    def __init__(self, secret: str, keys: KeyRing, max_age_seconds: int) -> None:
        # Keys of their own, derived from the deployment's secret: a session cookie is never a
        # valid report link and the other way round.
        root = secret.encode()
        self._serializer = URLSafeTimedSerializer(
            hmac.new(root, b"console-session-v1", hashlib.sha256).digest(), salt="console-session-v1")
        self._csrf_key = hmac.new(root, b"console-csrf-v1", hashlib.sha256).digest()
        self.keys = keys
        self.max_age_seconds = max_age_seconds

    def visitor(self, cookie: str | None) -> Visitor:
        """The visitor a request's cookie names; one with a new anonymous session if it names none."""
        session = self._load(cookie)
        if session is None:
            return self._visitor(None, None)
        digest, nonce = session
        if not self.keys.enabled:
            return self._visitor(None, nonce)
        key = self.keys.by_hash(digest) if digest else None
        if digest and key is None:  # the key was revoked: the session ends
            return self._visitor(None, None)
        return self._visitor(key, nonce)

    def signed_in(self, key: str) -> Visitor | None:
        """A new session for `key`, or None if it is not a key in force."""
        found = self.keys.verify(key)
        return self._visitor(found, None, digest=key_hash(key)) if found else None

    def signed_out(self) -> Visitor:
        return self._visitor(None, None)

    def csrf_valid(self, visitor: Visitor, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(visitor.csrf_token, token)

    def _visitor(self, key: ApiKey | None, nonce: str | None, digest: str | None = None) -> Visitor:
        """The visitor of an existing session (`nonce`), or of a new one (None), whose cookie names
        the key by `digest`."""
        if not self.keys.enabled:  # access control off: every visitor may do everything
            key = ApiKey(OPEN_ACTOR, frozenset(SCOPES))
            digest = None
        cookie = None
        if nonce is None:
            nonce = secrets.token_urlsafe(16)
            cookie = self._serializer.dumps({"k": digest, "n": nonce})
        token = hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).hexdigest()
        return Visitor(key, nonce, token, self.keys.enabled, cookie)

    def _load(self, cookie: str | None) -> tuple[str | None, str] | None:
        if not cookie:
            return None
        try:
            session = self._serializer.loads(cookie, max_age=self.max_age_seconds)
        except BadSignature:  # also an expired one
            return None
        if not isinstance(session, dict) or not isinstance(session.get("n"), str):
            return None
        digest = session.get("k")
        return (digest if isinstance(digest, str) else None), session["n"]
