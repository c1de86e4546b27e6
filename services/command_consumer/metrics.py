"""Prometheus metrics of the command consumer."""

from prometheus_client import Counter, Gauge, Histogram

from shared.outcomes import ErrorCode

COMMANDS = Counter("segmentation_commands_total", "Commands consumed, by type and outcome status",
                   ["type", "status"])
# Fine below a tenth of a second, where a consumer that keeps up is, so its quantiles read true there.
LATENCY_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06,
                   0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COMMAND_LATENCY = Histogram(
    "segmentation_command_latency_seconds",
    "From the command record's timestamp to its outcome being durable",
    buckets=LATENCY_BUCKETS,
)
PUBLISHED_LATENCY = Histogram(
    "segmentation_command_published_seconds",
    "From the command record's timestamp to its outcome being durable and acknowledged by Kafka",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("segmentation_consumer_batch_size", "Records applied in one batch transaction",
                       buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_DURATION = Histogram("segmentation_consumer_batch_seconds", "Duration of one batch transaction")
DLQ_RECORDS = Counter("segmentation_dlq_records_total", "Records sent to the DLQ, by reason", ["code"])
# Every reason's series from 0, so that the first dead letter after a start is an increase an
# alert sees (a series born at 1 shows none).
for _code in (ErrorCode.INVALID_JSON, ErrorCode.NOT_AN_OBJECT, ErrorCode.UNKNOWN_TYPE, ErrorCode.WRONG_TOPIC,
              ErrorCode.INVALID_FIELD, ErrorCode.TOO_LARGE):
    DLQ_RECORDS.labels(_code.value)
REPLAYED = Counter("segmentation_commands_replayed_total",
                   "Commands seen again (redelivery or repeated command id) whose stored outcome was re-published")
DB_RETRIES = Counter("segmentation_consumer_db_retries_total", "Batch transactions retried after a database error")
LAG = Gauge("segmentation_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"])
TIME_BEHIND = Gauge("segmentation_consumer_time_behind_seconds",
                    "Age of the oldest record of a partition fetched and not yet applied and published (0: none "
                    "waiting); it grows while a batch is stuck", ["topic", "partition"])
LAST_PROGRESS = Gauge("segmentation_consumer_last_progress_timestamp_seconds",
                      "When this consumer last published a batch's outcomes (Unix time)")
PUBLISH_FAILURES = Counter("segmentation_outcome_publish_failures_total",
                           "Publishes of a batch's outcomes or dead letters that Kafka did not acknowledge (nothing "
                           "of that batch is committed; the consumer stops and a restart publishes them again)")
TOO_OLD = Counter("segmentation_commands_too_old_total",
                  "Commands rejected too_old: their record was older than OUTCOME_RETENTION, past what the inbox "
                  "can check, so they were not applied")
PARTITIONS_LEASED = Gauge("segmentation_consumer_partitions_leased",
                          "Command partitions this process holds the lease of (CONSUMER_PARTITION_OWNERSHIP=lease); "
                          "0 in a standby")
SHARED_BATCH_SPLITS = Counter("segmentation_consumer_shared_batch_splits_total",
                              "Batches of several partitions that met a row lock and went on as a batch per partition")
SEGMENT_MEMBERS_REMOVED = Counter(
    "segmentation_segment_members_removed_total",
    "Explicit members of deleted segments removed in chunks after their command's batch")
