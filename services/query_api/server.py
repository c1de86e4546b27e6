"""uvicorn's httptools protocol with each response's writes sent together.

uvicorn writes a response's head and its body with two transport writes, and uvloop sends each
at once: a small JSON response costs two send() system calls. On loopback those are the largest
single cost of GET /users/{id}/segments in a profile of an API worker. Here the writes made
within one event-loop iteration are joined and sent at the end of that iteration; a streamed
body still leaves chunk by chunk, as each chunk is produced in an iteration of its own.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http import httptools_impl


class CoalescingTransport:
    """A transport whose writes within one loop iteration leave in one write, in order."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()  # what was written goes out before the connection closes
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        pending = sum(len(chunk) for chunk in self._pending) if self._pending else 0
        return pending + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str):  # everything else is the real transport's
        return getattr(self._transport, name)


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """Served by `python -m services.query_api` (uvicorn's `http` option)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control keeps the real transport; responses are written through the coalescing one.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
