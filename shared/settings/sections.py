"""The settings, one class per concern. Each field's description is what docs/configuration.md and
.env.example say about its variable (`python -m shared.settings` writes both)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.durations import parse_duration
from shared.settings.base import Section, comma_separated, comma_separated_urls, empty_is_unset

DEVELOPMENT_REPORT_SECRET = "development-only-report-secret"


def required(value: str | None, variable: str, what: str) -> str:
    """A server's address the service cannot start without: missing, it says which variable sets it."""
    if not value:
        raise SystemExit(f"{variable} is not set. Point it at {what}, or start everything on embedded servers "
                         "with `make run`.")
    return value


class DatabaseSettings(Section):
    title = "PostgreSQL"
    secrets = ("database_url",)

    database_url: str | None = Field(None, description=(
        "PostgreSQL URL, `postgresql://user:pass@host:port/db`; TLS with "
        "`?sslmode=verify-full&sslrootcert=…`; several hosts with `host1:port,host2:port` and "
        "`?target_session_attrs=read-write` (docs/operations.md, Highly available PostgreSQL). Unset: `make run` "
        "and the tests start an embedded server."))
    database_url_file: Path | None = Field(None, description="Read DATABASE_URL from this file instead.")
    read_database_urls: Annotated[list[str], NoDecode] = Field([], description=(
        "Streaming replicas for hot reads and reports, comma-separated; one URL may name several hosts "
        "(`?target_session_attrs=prefer-standby`) (docs/operations.md, Replicas)."))
    max_replica_lag_ms: int = Field(500, ge=0, description=(
        "A replica further behind than this gets no reads until it catches up."))
    read_token_wait_ms: int = Field(250, ge=0, description=(
        "How long a read with a consistency token waits for a replica before going to the primary."))
    replica_poll_interval_ms: int = Field(50, ge=10, description=(
        "How often each API worker measures the replicas' replay positions."))
    db_pool_min_size: int = Field(1, ge=0, description=(
        "Connections each API worker keeps open for everything but the hot read."))
    db_pool_max_size: int = Field(4, ge=1, description=(
        "Most connections of that pool. The consumer opens max(DB_POOL_MAX_SIZE, TOPIC_PARTITIONS + 2) "
        "at startup and keeps them."))
    read_pool_size: int = Field(4, ge=1, description=(
        "Connections each API worker keeps for GET /users/{id}/segments only, each with its query prepared."))

    _replicas_list = field_validator("read_database_urls", mode="before")(comma_separated_urls)

    def require_database_url(self) -> str:
        return required(self.database_url, "DATABASE_URL", "PostgreSQL (postgresql://user:pass@host:port/db)")


class KafkaSettings(Section):
    title = "Kafka: connection and topics"
    secrets = ("kafka_sasl_password", "kafka_ssl_key_password")

    kafka_bootstrap_servers: str | None = Field(None, description=(
        "`host:port[,host:port]`. Unset: `make run` starts an embedded broker; tools read the address it "
        "chose from `.data/stack.json`."))
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client of the project connects.")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism of the `SASL_` protocols.")
    kafka_sasl_username: str | None = Field(None, description="SASL user (needed by the `SASL_` protocols).")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_sasl_password_file: Path | None = Field(None, description="Read KAFKA_SASL_PASSWORD from this file.")
    kafka_ssl_ca_file: Path | None = Field(None, description="CA of the brokers' certificates (unset: the system's).")
    kafka_ssl_cert_file: Path | None = Field(None, description="Client certificate for mutual TLS (with the key).")
    kafka_ssl_key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="Password of the client key.")
    kafka_ssl_key_password_file: Path | None = Field(None, description="Read KAFKA_SSL_KEY_PASSWORD from this file.")
    segments_commands_topic: str = Field("segments.commands", description="Segment commands, keyed by slug.")
    assignments_commands_topic: str = Field("assignments.commands", description="User commands, keyed by user id.")
    results_topic: str = Field("segments.command-results", description="One outcome per command, keyed by its id.")
    dlq_topic: str = Field("segments.commands.dlq", description="Records that could not be parsed or validated.")
    membership_changes_topic: str = Field("segments.membership-changes", description=(
        "Every entry and exit, keyed by user id, and every rollout change, keyed by `segment:<slug>` "
        "(docs/contract.md, Membership changes)."))
    consumer_group: str = Field("segments-command-consumer", description="The command consumer's group.")
    topic_partitions: int = Field(8, ge=1, description="Partitions of the topics the service creates.")
    max_command_bytes: int = Field(1_048_576, ge=1024, description=(
        "Largest command record: the consumer dead-letters a larger one as `too_large`, and producers size "
        "their requests to carry three times this."))

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

    @property
    def command_topics(self) -> tuple[str, str]:
        return (self.segments_commands_topic, self.assignments_commands_topic)

    def require_kafka(self) -> str:
        return required(self.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS",
                        "a Kafka broker (host:port[,host:port])")


class ConsumerSettings(Section):
    title = "Command consumer"

    consumer_max_batch: int = Field(4000, ge=1, description=(
        "Most records of one partition applied in one transaction."))
    consumer_fetch_max_wait_ms: int = Field(10, ge=0, description="Broker wait for a fetch (latency against batching).")
    consumer_combine_records: int = Field(500, ge=0, description=(
        "Partitions of one topic fetched together share one transaction while their records add up to at "
        "most this; 0: a batch per partition."))
    consumer_shared_lock_timeout_ms: int = Field(200, ge=1, description=(
        "How long a shared batch waits for a row lock before each of its partitions goes on alone."))
    consumer_segment_removal_chunk: int = Field(10_000, ge=0, le=1_000_000, description=(
        "A deleted segment with more explicit members than this has them removed in transactions of "
        "this many each, after its command's batch, so that the commands behind it do not wait; its "
        "outcome comes with the last one. 0: all in the command's own transaction, whatever their number."))
    consumer_session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer group session timeout.")
    consumer_heartbeat_interval_ms: int = Field(1_000, ge=100, description="Consumer group heartbeat.")
    consumer_group_instance_id: str | None = Field(None, min_length=1, max_length=249, description=(
        "Static group membership (KIP-345): a restarted consumer gets its partitions back without a "
        "rebalance. One stable id per process, never shared."))
    consumer_partition_ownership: Literal["group", "lease"] = Field("group", description=(
        "`group`: the Kafka consumer group assigns partitions; `lease`: a PostgreSQL advisory lock per "
        "partition, one process takes them all and others stand by (docs/operations.md)."))
    consumer_lease_check_seconds: float = Field(0.5, gt=0, le=60, description=(
        "`lease`: how often a process tries the leases it does not hold and checks its session."))
    db_retry_attempts: int = Field(30, ge=1, description="Attempts of a batch transaction before the consumer exits.")
    db_retry_max_backoff_seconds: float = Field(5.0, gt=0, description="Cap of the backoff between attempts.")
    poison_guard_window: int = Field(500, ge=10, description="Records the bad-deploy guard looks back on.")
    poison_guard_max_invalid_share: float = Field(0.9, gt=0, le=1, description=(
        "Share of invalid records in that window that stops the consumer."))
    consumer_metrics_port: int = Field(9101, description="The consumer's /metrics port (0: none).")
    db_expect_synchronous_commit: bool = Field(False, description=(
        "True on a cluster whose primary should acknowledge commits only once a synchronous standby has them: "
        "the consumer warns whenever the primary acknowledges alone (docs/operations.md, Highly available "
        "PostgreSQL). The gauge segmentation_db_commits_synchronous says which, either way."))
    db_durability_check_seconds: float = Field(5.0, gt=0, description=(
        "How often the consumer checks whether its commits wait for a synchronous standby."))


class ApiSettings(Section):
    title = "Query API"
    secrets = ("report_signing_secret",)

    environment: Literal["development", "production"] = Field("development", description=(
        "`production` refuses to start the API without API keys or with the development signing secret, "
        "and turns the console off unless UI_ENABLED=true."))
    api_host: str = Field("127.0.0.1", description="Where the query API listens.")
    api_port: int = Field(8080, description="The query API's port.")
    api_workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    api_public_url: str | None = Field(None, description=(
        "Base of report links, the API's public address (set it in production)."))
    report_link_hosts: Annotated[list[str], NoDecode] = Field(["localhost", "127.0.0.1", "::1"], description=(
        "Without API_PUBLIC_URL, report links name the request's Host only when it is one of these; "
        "otherwise the address the request reached."))
    report_signing_secret: SecretStr = Field(SecretStr(DEVELOPMENT_REPORT_SECRET), description=(
        "The secret behind report links, import tokens and console sessions. Required with API keys or in "
        "production: a long random value, the same on every API replica."))
    report_signing_secret_file: Path | None = Field(None, description="Read REPORT_SIGNING_SECRET from this file.")
    report_link_ttl_seconds: int = Field(86_400, ge=1, description="Lifetime of a report link.")
    report_work_mem: str = Field("64MB", pattern=r"^[1-9][0-9]*(kB|MB|GB)$", description=(
        "PostgreSQL's work_mem for an all-users report of a month with rollout changes: each change "
        "sorts and joins a segment's explicit members against every registered user, on disk when this is "
        "too small. Each parallel worker may use it several times over, so size it to the database's memory."))
    rollout_cache_refresh_seconds: float = Field(0.25, gt=0, description=(
        "How often the API reloads live rollout segments in the background (reads reload at once when a "
        "segment changed)."))
    max_request_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    api_keys_file: Path | None = Field(None, description=(
        "API keys with scopes, one per line `<name>:<scopes>:<sha256>` (unset: the API is open)."))
    api_auth: Literal["enabled", "disabled"] = Field("enabled", description=(
        "`disabled`: no keys even in production, for a gateway in front that authenticates."))
    metrics_require_key: bool = Field(False, description="/metrics only for a valid API key.")
    prometheus_multiproc_dir: Path | None = Field(None, description=(
        "With API_WORKERS > 1, where the workers' metrics meet (unset: a temporary directory)."))

    _hosts_list = field_validator("report_link_hosts", mode="before")(comma_separated)


class ConsoleSettings(Section):
    title = "Web console"

    ui_enabled: bool | None = Field(None, description=(
        "The web console at /ui (unset: on in development, off in production)."))
    ui_session_hours: float = Field(8.0, gt=0, description="How long a console sign-in lasts.")
    ui_trace_url: str | None = Field(None, pattern=r"\{trace_id\}", description=(
        "A command's page links to this with its trace id, e.g. `http://jaeger:16686/trace/{trace_id}`."))

    _empty_is_unset = field_validator("ui_enabled", "ui_trace_url", mode="before")(empty_is_unset)

    def enabled_in(self, environment: str) -> bool:
        return self.ui_enabled if self.ui_enabled is not None else environment == "development"


class ExpirySettings(Section):
    title = "Expiry worker"

    expiry_batch_size: int = Field(10_000, ge=1, description="Memberships removed per transaction.")
    expiry_max_sleep_seconds: float = Field(1.0, gt=0, description="Longest sleep between polls when nothing is due.")
    expiry_concurrency: int = Field(1, ge=1, description=(
        "Batches one worker runs at once, each on a connection of its own and a core of the database's. On a "
        "server without cores to spare, more drain a backlog hardly faster and slow the hot read meanwhile."))
    expiry_metrics_port: int = Field(9102, description="The expiry worker's /metrics port (0: none).")


class PublisherSettings(Section):
    title = "Change publisher (the membership-changes stream)"

    publisher_batch_size: int = Field(5_000, ge=1, le=100_000, description=(
        "Changes read from the outbox, sent and acknowledged as one batch (more when one statement wrote more)."))
    publisher_poll_interval_seconds: float = Field(0.01, gt=0, le=10, description=(
        "Pause between outbox reads while it is empty: the bound on a change's wait before its batch."))
    publisher_standby_retry_seconds: float = Field(1.0, gt=0, description=(
        "How often a standby publisher tries to take over from the active one."))
    publisher_nice: int = Field(10, ge=0, le=19, description=(
        "CPU niceness the publisher adds to itself: on a host it shares with the writers or the database, a "
        "burst of changes is applied first and published right after (0: same priority)."))
    publisher_metrics_port: int = Field(9103, description="The change publisher's /metrics port (0: none).")


class RetentionSettings(Section):
    title = "Data retention (durations: 90s, 15m, 2h, 7d, 1w or seconds)"

    outcome_retention: int = Field(7 * 86_400, description=(
        "How long outcomes, and so command ids, are kept; older records are rejected `too_old`. Keep it "
        "above the command topics' retention plus the longest consumer outage."))
    outcome_partition_interval: int = Field(86_400, description="Record time each inbox partition covers.")
    outcome_partitions_ahead: int = Field(3, ge=1, description="Inbox partitions made in advance.")
    history_retention_months: int | None = Field(None, ge=1, description=(
        "Whole months of history kept before the current one (unset: all); older months' reports answer 410."))
    history_partitions_ahead: int = Field(3, ge=1, description="History months made in advance.")
    partition_maintenance_interval: int = Field(600, description=(
        "How often the expiry worker makes and drops partitions."))

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


class ObservabilitySettings(Section):
    title = "Logs and metrics"

    log_level: str = Field("INFO", description="Structured logs on stderr from this level.")
    log_format: Literal["json", "console"] = Field("json", description="`console` for humans.")
    metrics_host: str = Field("127.0.0.1", description=(
        "Where the consumer and the worker serve /metrics (`0.0.0.0` in containers)."))


class LocalStackSettings(Section):
    title = "Local stack (`make run`, the tests, the benchmarks)"

    data_dir: Path = Field(Path(".data"), description=(
        "Embedded PostgreSQL data, logs, and the addresses of a running `make run` (`stack.json`), which "
        "segmentctl, the Python client and the benchmarks read when no variable names the servers."))
    embedded_kafka_port: int = Field(9092, ge=1, le=65535, description="Where `make run` puts its embedded broker.")
    embedded_postgres_port: int = Field(55432, ge=1, le=65535, description=(
        "Where `make run` puts its embedded PostgreSQL."))
    embedded_postgres_root_dir: Path = Field(Path("/var/lib/segmentation-service"), description=(
        "As root only: where the embedded PostgreSQL's own account keeps its binaries and data."))


class TracingSettings(Section):
    """OpenTelemetry's own variables that decide whether tracing is on; the SDK reads the rest itself
    (the sampler, the exporter's endpoint and headers). Only the environment counts, as for the SDK."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")
    title = "Tracing (OpenTelemetry's standard variables)"

    otel_sdk_disabled: str = Field("", description="`true` keeps tracing off whatever else is set.")
    otel_traces_exporter: str = Field("", description=(
        "`otlp` or `console`; setting it (or an OTLP endpoint) turns tracing on."))
    otel_exporter_otlp_endpoint: str = Field("", description="OTLP/HTTP endpoint of the collector.")
    otel_exporter_otlp_traces_endpoint: str = Field("", description="The same, for traces only.")
    otel_service_name: str = Field("", description="Service name in traces (unset: `segmentation-<service>`).")
    otel_traces_sampler: str = Field("", description="The SDK's sampler, e.g. `parentbased_traceidratio`.")
    otel_traces_sampler_arg: str = Field("", description="The sampler's argument, e.g. `0.01` for 1 %.")
    otel_python_disabled_instrumentations: str = Field("", description=(
        "Comma-separated: `asyncpg`, `aiokafka`, `fastapi` (or `asgi`) to leave out."))

    @property
    def wanted(self) -> bool:
        if self.otel_sdk_disabled.strip().lower() == "true":
            return False
        exporter = self.otel_traces_exporter.strip().lower()
        return exporter not in ("", "none") or bool(self.otel_exporter_otlp_endpoint or
                                                     self.otel_exporter_otlp_traces_endpoint)

    def skipped(self, name: str) -> bool:
        listed = {item.strip().lower() for item in self.otel_python_disabled_instrumentations.split(",")}
        return name in listed or (name in ("asgi", "fastapi") and bool(listed & {"asgi", "fastapi"}))


class CliSettings(Section):
    title = "segmentctl"

    segmentctl_api_url: str | None = Field(None, description=(
        "The query API for `segmentctl status` and `user segments` (unset: where `make run` put it, else "
        "http://127.0.0.1:8080)."))
    segmentctl_api_key: SecretStr | None = Field(None, description="The API key segmentctl sends.")


class DockerComposeSettings(Section):
    """Read by docker-compose.yml only, never by the services: listed so that .env.example documents
    every variable a deployment sets."""

    title = "Docker Compose only (`make up`)"

    postgres_password: str = Field("segmentation", description="Password of the PostgreSQL container's user.")
    grafana_admin_password: str = Field("admin", description="Grafana's admin password.")
    kafka_ui_readonly: bool = Field(False, description="Kafka UI without actions that change topics or groups.")
