"""Shared resources of the API, created once in the lifespan and handed to routes as dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.query_api.auth import KeyRing, authorize
from services.query_api.replicas import TOKEN_PATTERN, InvalidToken, ReadRouter, parse_token
from services.query_api.reports import ReportSigner
from services.query_api.rollout_cache import RolloutCache
from shared.api_keys import ApiKey
from shared.client import CommandPublisher
from shared.settings import ApiSettings, ConsoleSettings, KafkaSettings


@dataclass
class Resources:
    api: ApiSettings
    kafka: KafkaSettings  # the topics' names (the AsyncAPI document, a record's trace)
    console: ConsoleSettings
    outcome_retention: int  # seconds an outcome is kept
    pool: asyncpg.Pool
    rollout: RolloutCache
    signer: ReportSigner
    publisher: CommandPublisher
    reads: ReadRouter  # where hot reads and reports go: the primary or a recent enough replica
    keys: KeyRing

    async def read_one(self, query, missing: str) -> Any:
        """A row from the primary (a replica when it is away), or 404 saying what is missing."""
        found = await self.reads.read(query, replica_first=False)
        if found is None:
            raise HTTPException(404, missing)
        return found

    def report_link(self, request: Request, year: int, month: int, user_id: int | None) -> str:
        """The absolute, signed link to a month's history CSV (of one user, or of all)."""
        return f"{self.link_base(request)}/reports/download?token={self.signer.sign(year, month, user_id)}"

    def link_base(self, request: Request) -> str:
        """Where links point: API_PUBLIC_URL; else the request's host if REPORT_LINK_HOSTS lists it;
        else the address the request actually reached. Never a Host header that is not listed: the
        client chooses it, and a link on a host of an attacker's would hand the report over."""
        if self.api.api_public_url:
            return self.api.api_public_url.rstrip("/")
        if request.url.hostname in self.api.report_link_hosts:
            return str(request.base_url).rstrip("/")
        server = request.scope.get("server")
        if not server or not server[0] or server[0].startswith("/"):  # a Unix socket: no address to give
            return ""
        host, port = server
        scheme = request.url.scheme
        authority = f"[{host}]" if ":" in host else host
        if port is not None and port != {"http": 80, "https": 443}.get(scheme):
            authority += f":{port}"
        return f"{scheme}://{authority}"


async def get_resources(request: Request) -> Resources:
    # async: a plain def dependency would run in the thread pool, a thread hop per request
    return request.app.state.resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="An API key: `Authorization: Bearer <key>`. Its scopes (read, reports, write, "
                                 "status) decide what it may do.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
CHALLENGE = 'Bearer realm="segmentation"'


def authenticate(keys: KeyRing, credentials: HTTPAuthorizationCredentials | None,
                 scope: str | None) -> ApiKey | None:
    """The caller's key, if it has `scope` (any valid key for None); None when authentication is
    off. 401 without a valid key, 403 without the scope."""
    if not keys.enabled:
        return None
    key = keys.verify(credentials.credentials) if credentials is not None else None
    denial = authorize(key, scope, sent=credentials is not None)
    if denial is None:
        return key
    if denial.status == 401:
        challenge = f'{CHALLENGE}, error="invalid_token"' if denial.invalid_key else CHALLENGE
        raise HTTPException(401, denial.message, headers={"WWW-Authenticate": challenge})
    raise HTTPException(denial.status, denial.message)


def _requiring(scope: str):
    async def dependency(request: Request, credentials: BearerDep) -> ApiKey | None:
        return authenticate(request.app.state.resources.keys, credentials, scope)

    return Depends(dependency)


# The caller's key with the scope a route needs (None with authentication off).
ReadKey = Annotated[ApiKey | None, _requiring("read")]
ReportsKey = Annotated[ApiKey | None, _requiring("reports")]
WriteKey = Annotated[ApiKey | None, _requiring("write")]
StatusKey = Annotated[ApiKey | None, _requiring("status")]


TOKEN_HEADER = "X-Consistency-Token"


async def consistency_token(
        # `str`, not `str | None`: a header or parameter is absent or a string, never null (a
        # nullable schema would invite clients, and fuzzers, to send the text "null").
        header: Annotated[str, Header(alias=TOKEN_HEADER, pattern=TOKEN_PATTERN, description=(  # noqa: RUF013
            "An outcome's consistency_token: the read is answered only by a server that has replayed it "
            "(waiting up to READ_TOKEN_WAIT_MS for a replica, then the primary)"))] = None,
        query: Annotated[str, Query(alias="consistency_token", pattern=TOKEN_PATTERN,  # noqa: RUF013
                                           description=f"The same as the {TOKEN_HEADER} header")] = None,
) -> int | None:
    given = header or query
    try:
        return parse_token(given) if given else None
    except InvalidToken as error:
        where = ("header", TOKEN_HEADER) if header else ("query", "consistency_token")
        raise RequestValidationError([{"loc": where, "msg": str(error), "type": "value_error"}]) from None


ConsistencyToken = Annotated[int | None, Depends(consistency_token)]
