import pytest

from services.query_api.app import create_app
from shared.settings import DEVELOPMENT_REPORT_SECRET, Settings


def test_production_refuses_the_development_report_secret():
    with pytest.raises(SystemExit, match="REPORT_SIGNING_SECRET"):
        create_app(Settings(_env_file=None, environment="production", database_url="postgresql://x/y"))


def test_production_starts_with_a_secret_of_its_own():
    settings = Settings(_env_file=None, environment="production", database_url="postgresql://x/y",
                        report_signing_secret="s3cret-from-a-vault", api_auth="disabled")
    assert settings.report_signing_secret.get_secret_value() != DEVELOPMENT_REPORT_SECRET
    assert create_app(settings).title


def test_settings_round_trip_through_the_environment(monkeypatch):
    settings = Settings(_env_file=None, api_port=9999, results_topic="x.results", database_url="postgresql://h/d")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings(_env_file=None) == settings


def test_production_without_a_public_url_warns_that_links_follow_the_host_header():
    from structlog.testing import capture_logs

    base = {"_env_file": None, "environment": "production", "database_url": "postgresql://x/y",
            "report_signing_secret": "s3cret-from-a-vault", "api_auth": "disabled"}
    with capture_logs() as logs:
        create_app(Settings(**base))
        create_app(Settings(**base, api_public_url="https://segments.example.com"))
    warnings = [entry for entry in logs if entry["log_level"] == "warning" and "API_AUTH" not in entry["event"]]
    assert len(warnings) == 1 and "API_PUBLIC_URL" in warnings[0]["event"]
