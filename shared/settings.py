"""One settings class for every service, read from the environment and an optional `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_REPORT_SECRET = "development-only-report-secret"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = "development"

    # Servers. Unset means "start the embedded ones" (make run, the test suite).
    database_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    data_dir: Path = Path(".data")

    # Topics and the consumer group (README: "The contract, in short", Topics).
    segments_commands_topic: str = "segments.commands"
    assignments_commands_topic: str = "assignments.commands"
    results_topic: str = "segments.command-results"
    dlq_topic: str = "segments.commands.dlq"
    consumer_group: str = "segments-command-consumer"
    topic_partitions: int = Field(8, ge=1)

    # Command consumer.
    consumer_max_batch: int = Field(4000, ge=1)
    consumer_fetch_max_wait_ms: int = Field(10, ge=0)
    consumer_session_timeout_ms: int = Field(10_000, ge=1000)
    consumer_heartbeat_interval_ms: int = Field(1_000, ge=100)
    max_command_bytes: int = Field(1_048_576, ge=1024)
    db_retry_attempts: int = Field(30, ge=1)
    db_retry_max_backoff_seconds: float = Field(5.0, gt=0)
    poison_guard_window: int = Field(500, ge=10)
    poison_guard_max_invalid_share: float = Field(0.9, gt=0, le=1)
    consumer_metrics_port: int = 9101
    metrics_host: str = "127.0.0.1"  # where the consumer and the worker serve /metrics

    # Query API.
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_workers: int = Field(1, ge=1)
    api_public_url: str | None = None
    report_signing_secret: str = DEVELOPMENT_REPORT_SECRET
    report_link_ttl_seconds: int = Field(86_400, ge=1)
    rollout_cache_refresh_seconds: float = Field(0.25, gt=0)
    max_request_body_bytes: int = Field(1_048_576, ge=1024)

    # Expiry worker.
    expiry_batch_size: int = Field(10_000, ge=1)
    expiry_max_sleep_seconds: float = Field(1.0, gt=0)
    expiry_concurrency: int = Field(2, ge=1)
    expiry_metrics_port: int = 9102

    # Database pool of each API worker. Reads are short, so a few connections per worker keep up;
    # more only add PostgreSQL backends contending for the same cores and lengthen the tail.
    db_pool_min_size: int = Field(1, ge=0)
    db_pool_max_size: int = Field(4, ge=1)
    read_pool_size: int = Field(4, ge=1)  # per API worker, for GET /users/{id}/segments only

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    @property
    def command_topics(self) -> tuple[str, str]:
        return (self.segments_commands_topic, self.assignments_commands_topic)

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables a service process reads."""
        return {name.upper(): str(value) for name, value in self.model_dump().items() if value is not None}

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SystemExit(
                "DATABASE_URL is not set. Point it at PostgreSQL (postgresql://user:pass@host:port/db) "
                "or start everything on embedded servers with `make run`."
            )
        return self.database_url

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS is not set. Point it at a Kafka broker (host:port[,host:port]) "
                "or start everything on embedded servers with `make run`."
            )
        return self.kafka_bootstrap_servers


@lru_cache
def get_settings() -> Settings:
    return Settings()
