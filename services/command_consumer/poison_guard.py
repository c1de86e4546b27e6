"""The bad-deploy guard: stop when most recent records are invalid, instead of dead-lettering them.

A broken producer deploy should page someone, not fill the DLQ (README: Invalid records).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from services.command_consumer.parsing import InvalidRecord, ParsedRecord


class PoisonGuardTripped(RuntimeError):
    """Most recent records are invalid: more likely a bad producer deploy than real commands."""


class PoisonGuard:
    """Looks back on the last `window` records of every partition together."""

    def __init__(self, window: int, max_invalid_share: float) -> None:
        self._recent_invalid: collections.deque[bool] = collections.deque(maxlen=window)
        self._max_invalid_share = max_invalid_share

    def check(self, batch: Iterable[ParsedRecord]) -> None:
        """Counts the batch in, and raises PoisonGuardTripped when the window is full and at least
        the allowed share of it is invalid; the batch must then not be applied."""
        recent = self._recent_invalid
        recent.extend(isinstance(parsed, InvalidRecord) for parsed in batch)
        if len(recent) < recent.maxlen:
            return
        share = sum(recent) / len(recent)
        if share >= self._max_invalid_share:
            raise PoisonGuardTripped(
                f"{share:.0%} of the last {len(recent)} records are invalid "
                f"(limit POISON_GUARD_MAX_INVALID_SHARE={self._max_invalid_share}); "
                "stopped without dead-lettering them. Fix the producer, then restart the consumer."
            )
