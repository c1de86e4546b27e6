"""A client of the query API for producer services and segmentctl: a command's outcome and a
user's segments, with the caller's API key.

    async with QueryClient("http://127.0.0.1:8080", api_key=os.environ.get("SEGMENTCTL_API_KEY")) as api:
        outcome = await api.command_outcome("c-42")        # None until the consumer has applied it
        segments = await api.user_segments(1000, outcome["consistency_token"])  # reflects c-42
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

CONSISTENCY_HEADER = "X-Consistency-Token"


class QueryApiError(RuntimeError):
    """The API could not be reached, refused the key, or answered an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QueryClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> QueryClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def command_outcome(self, command_id: str) -> dict[str, Any] | None:
        """The stored outcome, or None while the command has not been processed."""
        response = await self._get(f"/commands/{quote(command_id, safe='')}", "status", missing_ok=True)
        return None if response is None else response.json()

    async def user_segments(self, user_id: int, consistency_token: str | None = None) -> list[dict[str, Any]]:
        """A user's segments; with an outcome's `consistency_token`, as of that command or later
        (even when the API reads from replicas)."""
        headers = {CONSISTENCY_HEADER: consistency_token} if consistency_token else None
        return (await self._get(f"/users/{user_id}/segments", "read", headers=headers)).json()["segments"]

    async def _get(self, path: str, scope: str, missing_ok: bool = False,
                   headers: dict[str, str] | None = None) -> httpx.Response | None:
        try:
            response = await self._http.get(path, headers=headers)
        except httpx.HTTPError as error:
            raise QueryApiError(f"the query API at {self.base_url} is unreachable: {error!r}") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code in (401, 403):
            raise QueryApiError(f"the query API refused the API key: {_detail(response)}; this needs a key with "
                                f"the scope {scope!r} (SEGMENTCTL_API_KEY or --api-key)", response.status_code)
        if response.status_code != 200:
            raise QueryApiError(f"the query API answered {response.status_code}: {_detail(response)}",
                                response.status_code)
        return response


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:200]
