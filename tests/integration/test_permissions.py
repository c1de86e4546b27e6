"""The test session's embedded PostgreSQL changes no mode or owner outside the checkout: as root it
runs as an unprivileged account from places of that account's own, never by opening the caller's
directories to everyone."""

from __future__ import annotations

import os

import pytest

from devstack.embedded import EmbeddedPostgres
from devstack.server_home import ACCOUNT, ROOT_STATE_DIR
from tests.conftest import OUTSIDE_BEFORE, outside_the_checkout

pytestmark = pytest.mark.integration


def test_the_sessions_servers_changed_no_permission_outside_the_checkout(infra):
    assert OUTSIDE_BEFORE  # recorded before the servers started
    assert outside_the_checkout() == OUTSIDE_BEFORE


@pytest.mark.skipif(os.geteuid() != 0, reason="as an ordinary user the server runs as that user, from the wheel")
def test_as_root_the_server_runs_as_its_own_account_from_its_own_places(infra):
    if infra.postgres is None:
        pytest.skip("needs the embedded PostgreSQL the test session owns")
    import pwd

    account = pwd.getpwnam(ACCOUNT)
    postgres: EmbeddedPostgres = infra.postgres
    assert postgres.data_dir.is_relative_to(ROOT_STATE_DIR)
    assert not postgres.requested_dir.is_relative_to(ROOT_STATE_DIR)
    home = postgres.data_dir.parent
    assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (account.pw_uid, 0o700)
    assert ROOT_STATE_DIR.stat().st_mode & 0o777 == 0o711
    binaries = postgres.home.bin_dir
    assert binaries.is_relative_to(ROOT_STATE_DIR)
    assert binaries.stat().st_mode & 0o007 == 0  # nothing for others
    pid = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    assert fields["Uid"].split()[:2] == [str(account.pw_uid)] * 2
    assert fields["Groups"].split() == []  # none of root's groups
