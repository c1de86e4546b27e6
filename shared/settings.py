"""One settings class for every service, read from the environment and an optional `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.durations import parse_duration

DEVELOPMENT_REPORT_SECRET = "development-only-report-secret"
# Settings that are secrets: each can also be read from a file named by <NAME>_FILE (the Docker and
# Kubernetes secrets convention). None of them is ever logged or shown.
SECRETS = ("database_url", "kafka_sasl_password", "kafka_ssl_key_password", "report_signing_secret")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = "development"

    # Servers. Unset means "start the embedded ones" (make run, the test suite).
    database_url: str | None = None
    database_url_file: Path | None = None
    # Streaming replicas for hot reads and reports (comma-separated URLs); see services/query_api/replicas.py.
    read_database_urls: Annotated[list[str], NoDecode] = []
    max_replica_lag_ms: int = Field(500, ge=0)
    read_token_wait_ms: int = Field(250, ge=0)
    replica_poll_interval_ms: int = Field(50, ge=10)
    kafka_bootstrap_servers: str | None = None
    data_dir: Path = Path(".data")

    # How every Kafka client of the project connects (shared/kafka.py), with the names Kafka uses.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_ca_file: Path | None = None  # unset: the system's trusted CAs
    kafka_ssl_cert_file: Path | None = None  # with the key: mutual TLS
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_key_password_file: Path | None = None

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
    # Partitions of one topic fetched together share one transaction while their records add up
    # to at most this (services/command_consumer/consumer.py, _dispatch); 0: a batch per partition.
    consumer_combine_records: int = Field(500, ge=0)
    # How long a shared batch waits for a row lock before it splits into a batch per partition.
    consumer_shared_lock_timeout_ms: int = Field(200, ge=1)
    consumer_session_timeout_ms: int = Field(10_000, ge=1000)
    # Static group membership (KIP-345): a consumer restarted with the same id gets its partitions
    # back at once, without waiting out the session timeout for a rebalance. One id per process,
    # stable across its restarts (a StatefulSet pod name, a systemd instance); never shared.
    consumer_group_instance_id: str | None = Field(None, min_length=1, max_length=249)
    consumer_heartbeat_interval_ms: int = Field(1_000, ge=100)
    # How the consumer owns command partitions (README: "Partition ownership"): "group", the Kafka
    # consumer group's assignment (processes share the partitions); or "lease", a PostgreSQL
    # advisory lock per partition (one process takes them all, others stand by; a restarted or
    # standby process takes over as soon as the holder's database session ends).
    consumer_partition_ownership: Literal["group", "lease"] = "group"
    consumer_lease_check_seconds: float = Field(0.5, gt=0, le=60)
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
    # Without API_PUBLIC_URL, report links name the request's Host only when it is one of these (a
    # Host header is the client's to choose); otherwise the address the request reached.
    report_link_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    report_signing_secret: SecretStr = SecretStr(DEVELOPMENT_REPORT_SECRET)
    report_signing_secret_file: Path | None = None
    report_link_ttl_seconds: int = Field(86_400, ge=1)
    rollout_cache_refresh_seconds: float = Field(0.25, gt=0)
    max_request_body_bytes: int = Field(1_048_576, ge=1024)
    # Access control (services/query_api/auth.py). Without a keys file the API is open, which
    # production refuses unless API_AUTH=disabled says a gateway in front authenticates.
    api_keys_file: Path | None = None
    api_auth: Literal["enabled", "disabled"] = "enabled"
    metrics_require_key: bool = False
    # Web console at /ui (services/query_api/console): on in development, off in production unless
    # UI_ENABLED=true. UI_TRACE_URL links a command to its trace, e.g. http://jaeger:16686/trace/{trace_id}.
    ui_enabled: bool | None = None
    ui_session_hours: float = Field(8.0, gt=0)
    ui_trace_url: str | None = Field(None, pattern=r"\{trace_id\}")

    # Expiry worker.
    expiry_batch_size: int = Field(10_000, ge=1)
    expiry_max_sleep_seconds: float = Field(1.0, gt=0)
    expiry_concurrency: int = Field(2, ge=1)
    expiry_metrics_port: int = 9102

    # Data that stays bounded (README: "Data that stays bounded"). Durations: 90s, 15m, 2h, 7d, 1w
    # or seconds. The inbox window must exceed the command topics' retention plus the longest
    # consumer outage: a record older than it is rejected `too_old`, never applied unchecked.
    outcome_retention: int = 7 * 86_400
    outcome_partition_interval: int = 86_400  # one partition of the inbox per this much record time
    outcome_partitions_ahead: int = Field(3, ge=1)  # made in advance, in intervals
    history_retention_months: int | None = Field(None, ge=1)  # None: history is kept for ever
    history_partitions_ahead: int = Field(3, ge=1)  # months made in advance
    partition_maintenance_interval: int = 600  # how often the expiry worker maintains partitions

    # Database pool of each API worker. Reads are short, so a few connections per worker keep up;
    # more only add PostgreSQL backends contending for the same cores and lengthen the tail.
    db_pool_min_size: int = Field(1, ge=0)
    db_pool_max_size: int = Field(4, ge=1)
    read_pool_size: int = Field(4, ge=1)  # per API worker, for GET /users/{id}/segments only

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("read_database_urls", "report_link_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @field_validator("ui_enabled", "ui_trace_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("outcome_retention", "outcome_partition_interval", "partition_maintenance_interval",
                     mode="before")
    @classmethod
    def _duration(cls, value):
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_partitioning(self) -> Self:
        interval, retention = self.outcome_partition_interval, self.outcome_retention
        if interval > retention:
            raise ValueError(f"OUTCOME_PARTITION_INTERVAL ({interval}s) must not exceed OUTCOME_RETENTION "
                             f"({retention}s): a partition is dropped whole")
        if interval * self.outcome_partitions_ahead <= self.partition_maintenance_interval:
            raise ValueError(f"OUTCOME_PARTITION_INTERVAL x OUTCOME_PARTITIONS_AHEAD "
                             f"({interval * self.outcome_partitions_ahead}s) must exceed "
                             f"PARTITION_MAINTENANCE_INTERVAL ({self.partition_maintenance_interval}s), or "
                             "outcomes outrun the partitions made for them")
        return self

    @model_validator(mode="after")
    def _read_secret_files(self) -> Self:
        for name in SECRETS:
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            variable = f"{name.upper()}_FILE"
            if name in self.model_fields_set:
                raise ValueError(f"set {name.upper()} or {variable}, not both")
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as error:
                raise ValueError(f"{variable}={path}: cannot read it ({error.strerror})") from None
            setattr(self, name, value if name == "database_url" else SecretStr(value))
            setattr(self, f"{name}_file", None)  # read once; the value is what other processes get
        return self

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Self:
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_") and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and "
                             "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)")
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError("mutual TLS needs both KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE")
        for variable in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
            path = getattr(self, variable)
            if path is not None and not path.is_file():
                raise ValueError(f"{variable.upper()}={path}: no such file")
        return self

    def __repr_args__(self):
        from shared.db import redact  # the URL's password, like the SecretStr fields, is never shown

        for name, value in super().__repr_args__():
            if name == "database_url" and value:
                value = redact(value)
            elif name == "read_database_urls":
                value = [redact(url) for url in value]
            yield name, value

    @property
    def command_topics(self) -> tuple[str, str]:
        return (self.segments_commands_topic, self.assignments_commands_topic)

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables a service process reads (secrets included:
        for handing to a child process, never for showing)."""
        return {name.upper(): _as_env(value) for name, value in self if value is not None}

    @property
    def console_enabled(self) -> bool:
        return self.ui_enabled if self.ui_enabled is not None else self.environment == "development"

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


def _as_env(value) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


class ConfigurationError(SystemExit):
    """Settings that cannot work; the message says which variable and why, and shows no value."""


def explain(error: ValidationError) -> str:
    """A settings error as one line per problem, naming the variables, never echoing a value."""
    problems = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        variable = ".".join(str(part) for part in item["loc"]).upper()
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{variable}: {message}" if variable else message)
    return "invalid configuration: " + "; ".join(problems)


@lru_cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(explain(error)) from None
