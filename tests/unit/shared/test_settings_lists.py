"""List variables as the environment gives them: comma-separated, and for replica URLs a comma
inside one URL (several hosts) is not a separator."""

from __future__ import annotations

from shared.settings import Settings


def test_replica_urls_split_between_urls_never_between_the_hosts_of_one(monkeypatch):
    monkeypatch.setenv("READ_DATABASE_URLS", "postgresql://r@h1:5432,h2:5433/db?target_session_attrs=prefer-standby, "
                                             "postgres://r@h3/db,")
    assert Settings(_env_file=None).read_database_urls == [
        "postgresql://r@h1:5432,h2:5433/db?target_session_attrs=prefer-standby", "postgres://r@h3/db"]


def test_one_replica_and_none(monkeypatch):
    monkeypatch.setenv("READ_DATABASE_URLS", " postgresql://r@h1/db ")
    assert Settings(_env_file=None).read_database_urls == ["postgresql://r@h1/db"]
    monkeypatch.setenv("READ_DATABASE_URLS", "")
    assert Settings(_env_file=None).read_database_urls == []


def test_other_lists_still_split_on_every_comma(monkeypatch):
    monkeypatch.setenv("REPORT_LINK_HOSTS", "a.example, b.example,,")
    assert Settings(_env_file=None).report_link_hosts == ["a.example", "b.example"]
