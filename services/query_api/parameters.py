"""Path and query parameters that more than one route (or the fast path) takes, defined once."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path, Query

from shared.commands import MAX_SLUG_LENGTH, MAX_USER_ID, SLUG_PATTERN

USER_SEGMENTS_PATH = "/users/{user_id}/segments"
# The same path with a well-formed id, for the fast path: 1-19 digits without a leading zero;
# `user_id_from_path` checks the upper bound.
_USER_SEGMENTS_RE = re.compile(re.escape(USER_SEGMENTS_PATH).replace(r"\{user_id\}", "([1-9][0-9]{0,18})"))

UserIdPath = Annotated[int, Path(ge=1, le=MAX_USER_ID, description="user id, 1 … 2^63−1", examples=[1000])]
SlugPath = Annotated[str, Path(min_length=1, max_length=MAX_SLUG_LENGTH, pattern=SLUG_PATTERN,
                               examples=["AVITO_VOICE_MESSAGES"])]
# Command ids as stored: up to 64 characters, and derived ids ("<topic>:<partition>:<offset>") longer.
CommandIdPath = Annotated[str, Path(min_length=1, max_length=200)]
UserIdQuery = Annotated[int | None, Query(ge=1, le=MAX_USER_ID, description="user id, 1 … 2^63−1")]
Year = Annotated[int, Query(ge=1970, le=9999, description="year, 1970-9999", examples=[2026])]
Month = Annotated[int, Query(ge=1, le=12, description="month, 1-12", examples=[11])]


def user_id_from_path(path: str) -> int | None:
    """The user id of a GET /users/{user_id}/segments path that UserIdPath accepts, else None."""
    match = _USER_SEGMENTS_RE.fullmatch(path)
    if match is None:
        return None
    user_id = int(match.group(1))
    return user_id if user_id <= MAX_USER_ID else None
