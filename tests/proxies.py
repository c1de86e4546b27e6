"""TCP proxies for tests: plain, or TLS-terminating, on 127.0.0.1 in front of a local port.

The embedded Kafka broker serves plaintext only, and the embedded PostgreSQL is built without SSL
("SSL is not supported by this build"), so TLS to them runs through these, the way a managed
service's TLS listener looks to a client. PostgreSQL negotiates TLS inside its own protocol (an
SSLRequest answered with "S", then the handshake): PostgresTlsProxy speaks that part."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a local port: TLS-terminating with a context, plain without.
    stop() cuts every connection through it, as a network outage would."""

    def __init__(self, target_port: int, context: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self.context = context
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await self._forward(client_reader, client_writer)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            pipe = asyncio.create_task(self._pipe(reader, writer))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                writer.close()


SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class PostgresTlsProxy(TcpProxy):
    """TLS the way PostgreSQL offers it: a plain listener that answers a client's SSLRequest with
    "S" and then completes the TLS handshake (GSSAPI encryption is declined with "N")."""

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, code = struct.unpack("!II", await client_reader.readexactly(8))
                if code == GSSENC_REQUEST:
                    client_writer.write(b"N")
                    continue
                if code != SSL_REQUEST:  # a client that does not ask for TLS is not let through
                    client_writer.close()
                    return
                client_writer.write(b"S")
                await client_writer.drain()
                await client_writer.start_tls(self.context)
                break
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            client_writer.close()
            return
        await self._forward(client_reader, client_writer)
