"""The alerting rules: valid for Prometheus, each with a severity, a summary and a runbook section
that exists, and each unit-tested with promtool (tests/prometheus/alerts_test.yml) to fire on its
condition and stay quiet without it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus_server import PROMETHEUS_MISSING, promtool_path

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
ALERTS = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
PROMTOOL = promtool_path()
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=PROMETHEUS_MISSING)


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    runbook = (ROOT / "docs" / "runbook.md").read_text(encoding="utf-8")
    sections = {heading.lower() for heading in re.findall(r"^## (\w+)$", runbook, re.MULTILINE)}
    for rule in ALERTS:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor == rule["alert"].lower() and anchor in sections, rule["alert"]


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(TESTS.read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for rule in ALERTS:
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']} is never shown firing"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']} is never shown quiet"


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", TESTS.name], cwd=TESTS.parent, capture_output=True,
                            text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
