"""Ports: one whose old connections wait in TIME-WAIT is free; one held by a program is named."""

from __future__ import annotations

import os
import socket
import time

from devstack.processes import port_holder, port_is_free


def _server_closes_first() -> int:
    """A port whose server closed a connection before its client: the server side waits in TIME-WAIT."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's end closes first
    time.sleep(0.05)
    client.close()
    listener.close()
    time.sleep(0.05)
    return port


def test_a_port_in_time_wait_counts_as_free():
    port = _server_closes_first()
    with socket.socket() as plain:  # how the port was probed before: it looked busy
        try:
            plain.bind(("127.0.0.1", port))
            busy_without_reuse = False
        except OSError:
            busy_without_reuse = True
    assert busy_without_reuse, "the setup did not leave the port in TIME-WAIT"
    assert port_is_free(port)


def test_a_listening_port_is_taken_and_its_holder_named():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port)
        assert port_holder(port).startswith(f"PID {os.getpid()} (")


def test_free_ports_are_never_handed_out_twice_even_when_the_system_offers_one_again(monkeypatch):
    """The system may offer a port it offered a moment ago (the probe is closed in between);
    free_port asks again rather than give two servers the same port."""
    import socket as real_socket

    from devstack import processes

    offered = iter([50001, 50001, 50002, 50001, 50003])

    class Probe:
        def __init__(self, *args):
            self.port = None

        def setsockopt(self, *args):
            pass

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(processes, "_handed_out", set())
    monkeypatch.setattr(real_socket, "socket", Probe)
    assert [processes.free_port() for _ in range(3)] == [50001, 50002, 50003]
