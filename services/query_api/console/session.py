"""The console's sessions and CSRF tokens, with no session store.

Signing in with an API key sets a signed, timestamped cookie (itsdangerous) that names the key by
its SHA-256, never the key itself. Every request looks that hash up among the keys in force, so a
revoked key ends its sessions at once, on every API worker. The cookie is HttpOnly,
SameSite=Strict, limited to /ui, and Secure when the console is reached over HTTPS.

Signing out ends every session of that key, on every worker, with no session store: the key's
"not before" moment is kept in PostgreSQL (console_sign_outs), and a cookie issued before it is
refused. Each session also holds a random nonce; a state-changing form carries an HMAC of it (the CSRF
token), and a POST whose token does not match is refused. Signing in and out start a new nonce,
so a token seen before signing in is worthless after.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from itsdangerous import BadSignature, URLSafeTimedSerializer

from services.query_api.auth import KeyRing, authorize
from services.query_api.signing import CONSOLE_CSRF, CONSOLE_SESSIONS, purpose_key
from shared.api_keys import SCOPES, ApiKey, key_hash

COOKIE = "segmentation_console"
COOKIE_PATH = "/ui"
OPEN_ACTOR = "console"  # who the console's commands come from when access control is off


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who is looking: the key signed in (None if nobody), its scopes, and the session's nonce."""

    key: ApiKey | None
    key_hash: str | None  # how the session names its key (None: nobody signed in, or no access control)
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
        return authorize(self.key, scope) is None


NOT_BEFORE_SQL = "SELECT extract(epoch FROM not_before)::float8 FROM console_sign_outs WHERE key_hash = $1"
SIGN_OUT_SQL = """
INSERT INTO console_sign_outs (key_hash, not_before) VALUES ($1, to_timestamp($2))
ON CONFLICT (key_hash) DO UPDATE SET not_before = greatest(console_sign_outs.not_before, excluded.not_before)
"""


class SignOuts:
    """Per key, the moment before which its sessions are over, in the primary database so every API
    worker and replica agrees; `pool` is read when needed (the pool opens after the app is made)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool

    async def ended(self, digest: str, issued_at: float) -> bool:
        not_before = await self._pool().fetchval(NOT_BEFORE_SQL, digest)
        return not_before is not None and issued_at <= not_before

    async def end_sessions(self, digest: str, moment: float) -> None:
        await self._pool().execute(SIGN_OUT_SQL, digest, moment)


class Sessions:
    def __init__(self, secret: str, keys: KeyRing, max_age_seconds: int, sign_outs: SignOuts) -> None:
        # Keys of their own, derived from the deployment's secret: a session cookie is never a
        # valid report link and the other way round.
        self._serializer = URLSafeTimedSerializer(purpose_key(secret, CONSOLE_SESSIONS), salt=CONSOLE_SESSIONS)
        self._csrf_key = purpose_key(secret, CONSOLE_CSRF)
        self.keys = keys
        self.max_age_seconds = max_age_seconds
        self.sign_outs = sign_outs

    async def visitor(self, cookie: str | None) -> Visitor:
        """The visitor a request's cookie names; one with a new anonymous session if it names none."""
        session = self._load(cookie)
        if session is None:
            return self._visitor(None, None)
        digest, nonce, issued_at = session
        if not self.keys.enabled:
            return self._visitor(None, nonce)
        key = self.keys.by_hash(digest) if digest else None
        if digest and key is None:  # the key was revoked: the session ends
            return self._visitor(None, None)
        if digest and await self.sign_outs.ended(digest, issued_at):  # signed out since
            return self._visitor(None, None)
        return self._visitor(key, nonce, digest=digest)

    def signed_in(self, key: str) -> Visitor | None:
        """A new session for `key`, or None if it is not a key in force."""
        found = self.keys.verify(key)
        return self._visitor(found, None, digest=key_hash(key)) if found else None

    async def signed_out(self, visitor: Visitor) -> Visitor:
        """Ends every session of the visitor's key (issued up to now), and starts an anonymous one."""
        if visitor.key_hash:
            await self.sign_outs.end_sessions(visitor.key_hash, time.time())
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
            cookie = self._serializer.dumps({"k": digest, "n": nonce, "t": time.time()})
        token = hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).hexdigest()
        return Visitor(key, digest, nonce, token, self.keys.enabled, cookie)

    def _load(self, cookie: str | None) -> tuple[str | None, str, float] | None:
        if not cookie:
            return None
        try:
            session = self._serializer.loads(cookie, max_age=self.max_age_seconds)
        except BadSignature:  # also an expired one
            return None
        if not isinstance(session, dict) or not isinstance(session.get("n"), str):
            return None
        digest = session.get("k")
        issued_at = session.get("t")
        issued_at = float(issued_at) if isinstance(issued_at, (int, float)) else 0.0
        return (digest if isinstance(digest, str) else None), session["n"], issued_at
