"""The fault tests' comparison of the membership-changes topic with the history can fail: it
catches an invented event (one published for a change that never committed), a skipped change,
a changed field, a copy that differs, and one user's changes out of commit order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from shared.changes import encode, from_outbox
from tests.change_stream import problems

AT = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


def history_row(row_id: int, user_id: int, segment: str, operation: str = "I", reason: str = "manual") -> dict:
    return {"id": row_id, "user_id": user_id, "segment_slug": segment, "operation": operation, "source": "manual",
            "reason": reason, "executed_at": AT + timedelta(seconds=row_id), "command_id": f"c{row_id}",
            "expires_at": None}


HISTORY = [history_row(1, 10, "A"), history_row(2, 10, "B"), history_row(3, 11, "A"),
           history_row(4, 10, "A", "D")]
ROLLOUTS = [{"id": 1, "segment_slug": "A", "old_percent": Decimal(0), "new_percent": Decimal(10),
             "reason": "created", "executed_at": AT, "command_id": "s1"}]


def value(row: dict, kind: str = "membership") -> bytes:
    outbox = {**row, "kind": kind, "source_id": row["id"], "seq": row["id"], "written_at": AT}
    if kind == "rollout":
        outbox.update(user_id=None, operation=None, source=None, expires_at=None,
                      from_percent=row["old_percent"], to_percent=row["new_percent"])
    return encode(from_outbox(outbox))[1]


def published() -> list[bytes]:
    return [value(row) for row in HISTORY] + [value(ROLLOUTS[0], "rollout")]


def test_the_topic_equal_to_the_history_passes_also_with_duplicates():
    assert problems(published(), HISTORY, ROLLOUTS) == []
    again = published()
    assert problems(again + again[:2], HISTORY, ROLLOUTS) == []  # at least once: same id, same event


def test_an_event_for_a_change_that_never_committed_is_caught():
    invented = value(history_row(99, 10, "A"))  # a publisher sending before commit, then the rollback
    assert any("invented" in problem for problem in problems([*published(), invented], HISTORY, ROLLOUTS))


def test_a_skipped_change_is_caught():
    skipped = published()
    del skipped[2]
    assert problems(skipped, HISTORY, ROLLOUTS) == ["1 changes never published, e.g. ['membership-3']"]


def test_a_wrong_field_or_a_differing_copy_is_caught():
    wrong = published()
    wrong[0] = value({**HISTORY[0], "segment_slug": "Z"})
    assert any("membership-1" in problem for problem in problems(wrong, HISTORY, ROLLOUTS))
    copy = value({**HISTORY[1], "command_id": "other"})
    assert any("different content" in problem for problem in problems([*published(), copy], HISTORY, ROLLOUTS))


def test_one_users_changes_out_of_commit_order_are_caught():
    events = published()
    events[0], events[3] = events[3], events[0]  # user 10 leaves A before entering it
    found = problems(events, HISTORY, ROLLOUTS)
    assert any("('membership', 10, 'A')" in problem for problem in found)
    assert any("('user', 10)" in problem for problem in found)
