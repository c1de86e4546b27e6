"""Process utilities of the launcher, the embedded servers, tests and benchmarks: free ports,
children that die with their parent, stopping a child for sure, a coroutine run from sync code."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import socket
import subprocess
import threading


def free_port(preferred: int | None = None) -> int:
    """The preferred port when nothing listens on it, else any free one."""
    if preferred:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
