"""What can be checked of the Docker deployment without Docker: docker-compose.yml, the Prometheus
targets, the Grafana dashboard and .env.example against the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import services.change_publisher.publisher
import services.command_consumer.durability
import services.command_consumer.metrics
import services.expiry_worker.worker
import services.query_api.http_metrics
import services.query_api.replicas  # noqa: F401  (registers the API's metrics)
from shared.settings import SECTIONS, Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = {"command-consumer": "services.command_consumer", "query-api": "services.query_api",
                "expiry-worker": "services.expiry_worker", "change-publisher": "services.change_publisher"}
ONE_SHOT = {"provision"}
SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}


def env_of(service: dict) -> dict[str, str]:
    return {key: str(value) for key, value in (service.get("environment") or {}).items()}


def test_every_service_has_an_image_or_a_build_with_a_dockerfile():
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file(), name
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the tag"
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper


def test_the_image_contains_every_package_the_project_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./", dockerfile, re.MULTILINE))
    assert packages | {"migrations"} <= copied
    assert "pip install . " in dockerfile and "embedded" not in dockerfile  # no broker or database binaries


def test_long_running_services_have_health_checks_and_restart_policies():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        assert service.get("restart") in ("unless-stopped", "always"), name
        check = service.get("healthcheck", {})
        assert check.get("test") and check.get("interval") and check.get("retries"), f"{name} has no health check"


def test_dependencies_wait_for_healthy_services_and_the_finished_provisioning():
    for name, service in SERVICES.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, f"{name} → {dependency}"
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency]
    assert set(SERVICES["provision"]["depends_on"]) == {"postgres", "kafka"}
    for name in APP_SERVICES:
        assert "provision" in SERVICES[name]["depends_on"]


def test_each_app_service_runs_its_module_and_its_health_check_hits_its_port():
    for name, module in APP_SERVICES.items():
        service = SERVICES[name]
        assert service["command"][:3] == ["python", "-m", module]
        env = env_of(service)
        port = {"command-consumer": env.get("CONSUMER_METRICS_PORT"), "expiry-worker": env.get("EXPIRY_METRICS_PORT"),
                "change-publisher": env.get("PUBLISHER_METRICS_PORT"),
                "query-api": env.get("API_PORT", str(Settings.model_fields["api_port"].default))}[name]
        assert port and f":{port}/" in " ".join(service["healthcheck"]["test"]), name
        assert env["METRICS_HOST"] == "0.0.0.0" or name == "query-api"


def test_service_environment_names_only_real_settings():
    for name in [*APP_SERVICES, *ONE_SHOT]:
        # OTEL_* are OpenTelemetry's own variables, read by its SDK (shared/tracing.py).
        unknown = {variable for variable in env_of(SERVICES[name]) if not variable.startswith("OTEL_")} \
            - SETTINGS_VARIABLES
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"


def test_host_ports_do_not_collide():
    published = [str(port).split(":")[0] for service in SERVICES.values() for port in service.get("ports", [])]
    assert len(published) == len(set(published))
    assert {"8080", "8081", "9090", "3000", "16686"} <= set(published)  # API, Kafka UI, Prometheus, Grafana, Jaeger


def test_prometheus_scrapes_every_app_service_on_its_metrics_port():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {target for job in config["scrape_configs"] for static in job["static_configs"]
               for target in static["targets"]}
    expected = {f"command-consumer:{env_of(SERVICES['command-consumer'])['CONSUMER_METRICS_PORT']}",
                f"expiry-worker:{env_of(SERVICES['expiry-worker'])['EXPIRY_METRICS_PORT']}",
                f"change-publisher:{env_of(SERVICES['change-publisher'])['PUBLISHER_METRICS_PORT']}",
                f"query-api:{Settings.model_fields['api_port'].default}"}
    assert targets == expected
    mount = SERVICES["prometheus"]["volumes"][0]
    assert mount.startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml")
    # The alerting rules are mounted where prometheus.yml loads them from.
    rules_mount = "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"
    assert rules_mount in SERVICES["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]


def _exported_metric_names() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""],
                "summary": ["_sum", "_count", ""]}
    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("segmentation_")
            for suffix in suffixes[family.type]}


DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "segmentation.json").read_text())
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]


@pytest.mark.parametrize("panel", PANELS, ids=[panel["title"] for panel in PANELS])
def test_every_dashboard_panel_queries_metrics_the_code_exports(panel):
    exported = _exported_metric_names()
    for target in panel["targets"]:
        if target["expr"].startswith("ALERTS{"):  # Prometheus's own series of its alerts
            assert 'alertname=~"Segmentation.*"' in target["expr"]
            continue
        names = set(re.findall(r"\bsegmentation_[a-z_]+\b", target["expr"]))
        assert names and names <= exported, f"{panel['title']}: {names - exported} not exported"
        assert target["expr"].count("(") == target["expr"].count(")")


def test_dashboard_covers_what_operators_watch_and_is_provisioned():
    titles = " | ".join(panel["title"].lower() for panel in PANELS)
    for topic in ("commands/s by type and status", "outcome latency p50 / p99", "lag per partition", "dlq",
                  "api requests/s", "api latency", "expiry backlog", "expiry lag",
                  "changes published", "commit to publish", "oldest unpublished change"):
        assert topic in titles, topic
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {panel["datasource"]["uid"] for panel in PANELS} == {datasource["datasources"][0]["uid"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/segmentation.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(volume.startswith("./deploy/grafana/dashboards:" + path) for volume in SERVICES["grafana"]["volumes"])


def _env_example() -> set[str]:
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def test_env_example_documents_every_variable_and_nothing_else():
    documented = _env_example()
    every_section = {name.upper() for section in SECTIONS for name in section.model_fields}
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert documented == every_section
    assert interpolated <= documented, f"undocumented: {interpolated - documented}"


def test_nothing_secret_is_committed():
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in ("POSTGRES_PASSWORD", "REPORT_SIGNING_SECRET", "GF_SECURITY_ADMIN_PASSWORD"):
        for line in text.splitlines():
            if line.strip().startswith(f"{variable}:"):
                assert "${" in line, f"{variable} must come from the environment or .env"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
