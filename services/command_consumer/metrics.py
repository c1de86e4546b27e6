"""Prometheus metrics of the command consumer."""

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter("segmentation_commands_total", "Commands consumed, by type and outcome status",
                   ["type", "status"])
COMMAND_LATENCY = Histogram(
    "segmentation_command_latency_seconds",
    "From the command record's timestamp to its outcome being durable",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram("segmentation_consumer_batch_size", "Records applied in one batch transaction",
                       buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_DURATION = Histogram("segmentation_consumer_batch_seconds", "Duration of one batch transaction")
DLQ_RECORDS = Counter("segmentation_dlq_records_total", "Records sent to the DLQ, by reason", ["code"])
REPLAYED = Counter("segmentation_commands_replayed_total",
                   "Commands seen again (redelivery or repeated command id) whose stored outcome was re-published")
DB_RETRIES = Counter("segmentation_consumer_db_retries_total", "Batch transactions retried after a database error")
LAG = Gauge("segmentation_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"])
TOO_OLD = Counter("segmentation_commands_too_old_total",
                  "Commands rejected too_old: their record was older than OUTCOME_RETENTION, past what the inbox "
                  "can check, so they were not applied")
PARTITIONS_LEASED = Gauge("segmentation_consumer_partitions_leased",
                          "Command partitions this process holds the lease of (CONSUMER_PARTITION_OWNERSHIP=lease); "
                          "0 in a standby")
SHARED_BATCH_SPLITS = Counter("segmentation_consumer_shared_batch_splits_total",
                              "Batches of several partitions that met a row lock and went on as a batch per partition")
