"""The machine's disks, watched beside a benchmark round: the longest time a disk went without
completing any request while one was waiting on it.

Every COMMIT waits for the WAL's flush to the disk, so no round's latency tail can be shorter
than the longest such pause in it. Printed beside a round's figures, it tells a disk that stopped
from a service that was slow (a virtual disk can complete nothing for hundreds of milliseconds
while the load on it is small). Linux only: elsewhere there is nothing to read and no figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

DISKSTATS = Path("/proc/diskstats")
SYS_BLOCK = Path("/sys/block")
# Fields of a /proc/diskstats line after major, minor and name (the kernel's iostats.rst).
_COMPLETED_FIELDS = (0, 4, 11, 15)  # reads, writes, discards, flushes completed
_IN_FLIGHT_FIELD = 8


class Sample(NamedTuple):
    at: float  # time.monotonic() of the reading
    completed: int  # requests of every kind completed so far
    in_flight: int  # requests waiting on the disk now


def parse(text: str, disks: Iterable[str], at: float) -> dict[str, Sample]:
    """The named disks' samples from the text of /proc/diskstats (older kernels have fewer fields:
    what is missing counts as none)."""
    wanted = set(disks)
    samples = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 14 or fields[2] not in wanted:
            continue
        counters = [int(value) for value in fields[3:]]
        completed = sum(counters[index] for index in _COMPLETED_FIELDS if index < len(counters))
        samples[fields[2]] = Sample(at, completed, counters[_IN_FLIGHT_FIELD])
    return samples


def longest_pause(samples: Iterable[Sample]) -> float:
    """Seconds of the longest run of consecutive samples of one disk in which requests were in
    flight and none completed (from the last sample that saw a completion to the last one that
    saw none: at most one sampling interval short of the truth, never longer)."""
    longest = 0.0
    began: float | None = None
    previous: Sample | None = None
    for sample in samples:
        if previous is not None and sample.completed == previous.completed and previous.in_flight and sample.in_flight:
            if began is None:
                began = previous.at
            longest = max(longest, sample.at - began)
        else:
            began = None
        previous = sample
    return longest


def whole_disks() -> list[str]:
    """The machine's disks (not their partitions), without loop and RAM devices."""
    if not SYS_BLOCK.is_dir():
        return []
    return sorted(path.name for path in SYS_BLOCK.iterdir() if not path.name.startswith(("loop", "ram", "zram")))


class DiskWatch:
    """`with DiskWatch() as watch: …`, then `watch.longest_pause()`: seconds, or None where the
    machine has no /proc/diskstats. A thread reads it every `interval` seconds meanwhile."""

    def __init__(self, interval: float = 0.01) -> None:
        self._interval = interval
        self._disks = whole_disks() if DISKSTATS.exists() else []
        self._samples: dict[str, list[Sample]] = {disk: [] for disk in self._disks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-watch", daemon=True)

    def __enter__(self) -> DiskWatch:
        if self._disks:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for disk, sample in parse(DISKSTATS.read_text(), self._disks, time.monotonic()).items():
                self._samples[disk].append(sample)

    def longest_pause(self) -> float | None:
        if not self._disks:
            return None
        return max(longest_pause(samples) for samples in self._samples.values())
