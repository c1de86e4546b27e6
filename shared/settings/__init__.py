"""Settings by concern (sections.py), read from the environment and an optional `.env` file.

An entry point loads `Settings`, every section at once, and hands each part of the service only
its section (`settings.section(KafkaSettings)`) or plain values. Variable names are the fields'
names, upper-cased; docs/configuration.md and .env.example are generated from the fields.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import ValidationError

from shared.settings.sections import (
    DEVELOPMENT_REPORT_SECRET,
    ApiSettings,
    CliSettings,
    ConsoleSettings,
    ConsumerSettings,
    DatabaseSettings,
    DockerComposeSettings,
    ExpirySettings,
    KafkaSettings,
    LocalStackSettings,
    ObservabilitySettings,
    PublisherSettings,
    RetentionSettings,
    TracingSettings,
)

__all__ = [
    "DEVELOPMENT_REPORT_SECRET", "SECTIONS", "ApiSettings", "CliSettings", "ConfigurationError", "ConsoleSettings",
    "ConsumerSettings", "DatabaseSettings", "DockerComposeSettings", "ExpirySettings", "KafkaSettings",
    "LocalStackSettings", "ObservabilitySettings", "PublisherSettings", "RetentionSettings", "Settings",
    "TracingSettings", "explain",
    "get_settings",
]


class Settings(DatabaseSettings, KafkaSettings, ConsumerSettings, ApiSettings, ConsoleSettings, ExpirySettings,
               PublisherSettings, RetentionSettings, ObservabilitySettings, LocalStackSettings):
    """Every section the services read, for entry points, the launcher and the tests."""

    secrets = DatabaseSettings.secrets + KafkaSettings.secrets + ApiSettings.secrets

    @property
    def console_enabled(self) -> bool:
        return self.enabled_in(self.environment)


# In the order the configuration docs list them.
SECTIONS = (DatabaseSettings, KafkaSettings, ConsumerSettings, ApiSettings, ConsoleSettings, ExpirySettings,
            PublisherSettings, RetentionSettings, ObservabilitySettings, LocalStackSettings, TracingSettings,
            CliSettings, DockerComposeSettings)


class ConfigurationError(SystemExit):
    """Settings that cannot work; the message says which variable and why, and shows no value."""


def explain(error: ValidationError) -> str:
    """A settings error as one line per problem, naming the variables, never echoing a value."""
    from shared.validation import rule  # the same words as every other refusal

    problems = []
    for item in error.errors(include_url=False, include_input=False):
        variable = ".".join(str(part) for part in item["loc"]).upper()
        problems.append(f"{variable}: {rule(item)}" if variable else rule(item))
    return "invalid configuration: " + "; ".join(problems)


@lru_cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(explain(error)) from None
