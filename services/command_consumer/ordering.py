"""Which segment batches in hand a user batch waits for: those naming a segment it names.

A segment command and a user command fetched together apply in that order when they name the
same segment (a user added to a segment created in the same fetch; a removal after a percent
change). A user batch naming none of a segment batch's segments has nothing to wait for: making
every user batch wait for every segment batch stalled all user traffic behind one long segment
command (the deletion of a segment with millions of members). What a record names is read from
its value; a record that cannot be read so (it is on its way to the DLQ) waits for everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson

Slugs = frozenset[str] | None  # None: unknown, conflicts with everything


def named_slugs(records: Iterable[Any]) -> Slugs:
    """The segment slugs these records' commands name (a segment command's `slug`, a user
    command's `add` and `remove`); None when a record's value cannot be read as a command."""
    slugs: set[str] = set()
    for record in records:
        try:
            command = orjson.loads(record.value)
        except (orjson.JSONDecodeError, TypeError):
            return None
        if not isinstance(command, dict):
            return None
        if isinstance(command.get("slug"), str):
            slugs.add(command["slug"])
        for name in ("add", "remove"):
            values = command.get(name)
            if values is None:
                continue
            if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
                return None
            slugs.update(values)
    return frozenset(slugs)


class SegmentBarrier:
    """The segment batches in hand and the slugs each names."""

    def __init__(self) -> None:
        self._slugs: dict[asyncio.Task, Slugs] = {}

    def started(self, task: asyncio.Task, records: Iterable[Any]) -> None:
        self._slugs[task] = named_slugs(records)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._slugs.pop(task, None)

    def for_users(self, records: Iterable[Any]) -> set[asyncio.Task]:
        """The segment batches in hand that a user batch of these records waits for."""
        if not self._slugs:
            return set()
        wanted = named_slugs(records)
        return {task for task, slugs in self._slugs.items()
                if not task.done() and (slugs is None or wanted is None or not slugs.isdisjoint(wanted))}
