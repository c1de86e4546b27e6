"""The disk watch printed beside the consumer's latency rounds (bench/disk.py)."""

import time

from bench import disk
from bench.disk import DiskWatch, Sample, longest_pause, parse

# Two disks and a loop device as /proc/diskstats gives them on a 5.x+ kernel (20 fields), and a
# line of an older kernel (14 fields: no discard or flush counters).
DISKSTATS = """\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 100 5 800 40 200 7 1600 90 3 120 150 10 0 0 0 30 12
 254      16 vdb 1 0 8 1 2 0 16 1 0 2 2 0 0 0 0 0 0
   8       0 sda 50 0 400 20 60 0 480 30 1 40 50
"""


def test_parse_counts_every_kind_of_completion_and_the_requests_in_flight():
    samples = parse(DISKSTATS, ["vda", "sda"], at=7.0)

    # vda: 100 reads + 200 writes + 10 discards + 30 flushes; 3 in flight.
    assert samples["vda"] == Sample(7.0, 340, 3)
    # The older kernel's line has no discard or flush counters.
    assert samples["sda"] == Sample(7.0, 110, 1)
    assert set(samples) == {"vda", "sda"}  # only the disks asked for


def test_longest_pause_is_the_longest_run_without_a_completion_while_requests_wait():
    samples = [
        Sample(0.00, 10, 1),
        Sample(0.01, 11, 1),  # completions
        Sample(0.02, 11, 2),  # nothing completed from here...
        Sample(0.03, 11, 2),
        Sample(0.04, 11, 1),  # ...to here: 0.01 → 0.04
        Sample(0.05, 15, 0),
        Sample(0.06, 15, 0),  # idle, nothing waiting: not a pause
        Sample(0.07, 15, 0),
        Sample(0.08, 15, 1),
        Sample(0.09, 15, 1),  # a second, shorter pause
    ]

    assert longest_pause(samples) == 0.04 - 0.01


def test_no_pause_when_every_sample_sees_a_completion_or_nothing_waits():
    assert longest_pause([Sample(0.0, 1, 1), Sample(0.01, 2, 1), Sample(0.02, 3, 1)]) == 0.0
    assert longest_pause([Sample(0.0, 5, 0), Sample(0.5, 5, 0)]) == 0.0
    assert longest_pause([]) == 0.0


def test_watch_reads_the_disks_in_a_thread_until_it_exits(tmp_path, monkeypatch):
    stats = tmp_path / "diskstats"
    stats.write_text(" 254 0 vda 1 0 0 0 1 0 0 0 1 0 0 0 0 0 0 0 0\n")  # one request waiting, none completing
    monkeypatch.setattr(disk, "DISKSTATS", stats)
    monkeypatch.setattr(disk, "whole_disks", lambda: ["vda"])

    with DiskWatch(interval=0.005) as watch:
        time.sleep(0.1)
    stalled = watch.longest_pause()
    assert stalled is not None and stalled > 0

    stats.write_text(" 254 0 vda 1 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n")  # nothing waiting
    with DiskWatch(interval=0.005) as idle:
        time.sleep(0.05)
    assert idle.longest_pause() == 0.0


def test_no_figure_where_there_is_no_diskstats(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "DISKSTATS", tmp_path / "missing")

    with DiskWatch() as watch:
        pass
    assert watch.longest_pause() is None
