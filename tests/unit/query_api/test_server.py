"""The API's HTTP protocol: a response's head and body leave in one write."""

from __future__ import annotations

import asyncio

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornHttpToolsProtocol
from uvicorn.server import ServerState

from services.query_api.server import CoalescingTransport, HttpToolsProtocol
from shared.settings import Settings


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_iteration_leave_together_and_in_order():
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"head ")
    transport.write(b"")
    transport.writelines([b"body", b"!"])
    assert real.writes == []
    assert transport.get_write_buffer_size() == 10
    await next_iteration()
    assert real.writes == [b"head body!"]

    transport.write(b"next chunk")
    await next_iteration()
    transport.write(b"and another")
    await next_iteration()
    assert real.writes == [b"head body!", b"next chunk", b"and another"]


async def test_close_sends_what_was_written_first_and_abort_drops_it():
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert real.writes == [b"last words"] and real.closed
    await next_iteration()
    assert real.writes == [b"last words"]  # the scheduled flush finds nothing left

    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"never sent")
    transport.abort()
    await next_iteration()
    assert real.writes == [] and real.aborted
    assert transport.get_extra_info("peername") == ("127.0.0.1", 50000)  # the rest is the real transport's


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b'{"user_id":1}'})


async def serve_one_request(protocol_class) -> list[bytes]:
    config = Config(app=app, log_level="warning", lifespan="off")
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /users/1/segments HTTP/1.1\r\nHost: api\r\n\r\n")
    for _ in range(10):
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport.writes


async def test_a_response_is_one_write_where_uvicorn_makes_two():
    ours = await serve_one_request(HttpToolsProtocol)
    assert len(ours) == 1
    assert ours[0].startswith(b"HTTP/1.1 200 OK\r\n") and ours[0].endswith(b'\r\n\r\n{"user_id":1}')
    assert len(await serve_one_request(UvicornHttpToolsProtocol)) == 2  # what the subclass saves


def test_the_api_is_served_with_it(monkeypatch):
    from services.query_api import __main__ as entrypoint

    served = {}
    settings = Settings(_env_file=None, database_url="postgresql://postgres@127.0.0.1:1/postgres")
    monkeypatch.setattr(entrypoint, "bootstrap", lambda service: settings)  # leaves logging alone
    monkeypatch.setattr(entrypoint.uvicorn, "run", lambda *args, **kwargs: served.update(kwargs))
    monkeypatch.setattr("sys.argv", ["query_api", "--workers", "1"])
    entrypoint.cli()
    config = Config(app=app, http=served["http"])
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
