"""Process utilities of the launcher, the embedded servers, tests and benchmarks: free ports,
children that die with their parent, stopping a child for sure, a coroutine run from sync code."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import socket
import subprocess
import threading

import psutil


def _probe() -> socket.socket:
    # SO_REUSEADDR, as every server here sets it: a port whose old connections wait in TIME-WAIT
    # after a server stopped is free for the next one, and must look free.
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return probe


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with _probe() as probe:
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


# Ports this process has handed out. The system may give the same free port to two probes in a
# row (the first is closed before the second binds), and two servers told the same port collide:
# the second fails to bind while the first answers in its place.
_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_port(preferred: int | None = None) -> int:
    """The preferred port when nothing listens on it, else a free one this process has not handed
    out before."""
    if preferred and port_is_free(preferred):
        return preferred
    with _handing_out:
        while True:
            with _probe() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_holder(port: int) -> str | None:
    """Who listens on `port`, as "PID 123 (command line)", where the system lets us see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            if connection.pid is None:
                return None
            try:
                command = " ".join(psutil.Process(connection.pid).cmdline()) or psutil.Process(connection.pid).name()
            except psutil.Error:
                command = "?"
            return f"PID {connection.pid} ({command[:100]})"
    return None


def die_with_parent() -> None:
    """Child side of Popen: get SIGTERM when the process that started us dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_coroutine(coroutine):
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
