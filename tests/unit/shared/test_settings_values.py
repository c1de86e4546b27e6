"""Values checked where they are read, so a mistyped one stops the service at its start with the
variable's name, not at the first query that uses it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings


@pytest.mark.parametrize("value", ["64MB", "512kB", "1GB"])
def test_report_work_mem_takes_a_size_postgresql_reads(monkeypatch, value):
    monkeypatch.setenv("REPORT_WORK_MEM", value)
    assert Settings(_env_file=None).report_work_mem == value


@pytest.mark.parametrize("value", ["lots", "64", "64mb", "0MB", "64MB; DROP TABLE users"])
def test_report_work_mem_refuses_anything_else(monkeypatch, value):
    monkeypatch.setenv("REPORT_WORK_MEM", value)
    with pytest.raises(ValidationError, match="report_work_mem"):
        Settings(_env_file=None)
