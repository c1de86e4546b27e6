from __future__ import annotations

import pytest

from services.command_consumer.durability import acknowledged_by_a_standby


@pytest.mark.parametrize(("standbys", "level", "synchronous"), [
    ("", "on", False),  # no standby named: the primary acknowledges alone whatever the level
    ("  ", "remote_apply", False),
    ("ANY 1 (pgautofailover_standby_2)", "on", True),
    ("node_2", "remote_write", True),
    ("node_2", "remote_apply", True),
    ("node_2", "local", False),  # this session does not wait for the standby
    ("node_2", "off", False),
])
def test_a_commit_waits_for_a_standby_only_when_one_is_named_and_the_level_waits(standbys, level, synchronous):
    assert acknowledged_by_a_standby(standbys, level) is synchronous
