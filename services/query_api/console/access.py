"""Who is looking at the console and what they may see: the visitor a request's cookie names, and
the scope each page needs (the one rule of access, `authorize`, decides through Visitor.can)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.query_api.console.deps import ConsoleError, console_of
from services.query_api.console.session import COOKIE, Visitor


class SignInNeeded(Exception):
    def __init__(self, then: str) -> None:
        super().__init__(then)
        self.then = then


async def visitor_of(request: Request) -> Visitor:
    return await console_of(request).sessions.visitor(request.cookies.get(COOKIE))


VisitorDep = Annotated[Visitor, Depends(visitor_of)]


def _requiring(scope: str):
    async def dependency(request: Request, visitor: VisitorDep) -> Visitor:
        if not visitor.signed_in:
            then = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInNeeded(then)
        if not visitor.can(scope):
            raise ConsoleError(403, "Not allowed", f"The key {visitor.name!r} does not have the scope {scope!r} "
                                                   "this page needs. Ask for a key that has it.")
        return visitor

    return Depends(dependency)


Reader = Annotated[Visitor, _requiring("read")]
Writer = Annotated[Visitor, _requiring("write")]
StatusReader = Annotated[Visitor, _requiring("status")]
