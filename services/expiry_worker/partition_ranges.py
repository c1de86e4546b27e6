"""The time ranges of the partitioned tables, and their partitions' names and bounds: pure, so
the maintenance (partitions.py), its tests and the benchmarks agree on them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Table:
    name: str
    key: str  # the partition key column

    @property
    def default(self) -> str:
        return f"{self.name}_default"


HISTORY = Table("membership_history", "executed_at")
OUTCOMES = Table("command_outcomes", "recorded_at")


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None  # None: open below (MINVALUE)
    upper: datetime | None  # None: open above (MAXVALUE)


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=index // 12, month=index % 12 + 1)


def month_ranges(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """Whole months from the one holding `start` until one reaches past `end`."""
    ranges, lower = [], month_start(start)
    while lower <= end:
        ranges.append((lower, add_months(lower, 1)))
        lower = add_months(lower, 1)
    return ranges


def interval_ranges(start: datetime, end: datetime, seconds: int) -> list[tuple[datetime, datetime]]:
    """Ranges from `start` until one reaches past `end`, ending on multiples of `seconds` since
    the Unix epoch (the first one may be shorter: it starts where the previous partition ended)."""
    ranges, lower = [], start
    while lower <= end:
        offset = (lower - EPOCH).total_seconds()
        upper = EPOCH + timedelta(seconds=(offset // seconds + 1) * seconds)
        ranges.append((lower, upper))
        lower = upper
    return ranges


def history_partition_name(lower: datetime) -> str:
    return f"{HISTORY.name}_p{lower:%Y%m}"


def outcome_partition_name(lower: datetime) -> str:
    return f"{OUTCOMES.name}_p{lower:%Y%m%dt%H%M%S}"


_BOUND = re.compile(r"FOR VALUES FROM \((MINVALUE|'[^']*')\) TO \((MAXVALUE|'[^']*')\)")


def parse_bound(expression: str) -> tuple[datetime | None, datetime | None] | None:
    """The range of a partition bound as PostgreSQL prints it (the session in UTC); None for DEFAULT."""
    match = _BOUND.fullmatch(expression)
    if match is None:
        return None

    def moment(text: str) -> datetime | None:
        return None if text in ("MINVALUE", "MAXVALUE") else datetime.fromisoformat(text.strip("'")).astimezone(UTC)

    return moment(match.group(1)), moment(match.group(2))
