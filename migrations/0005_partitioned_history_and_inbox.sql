-- depends: 0004_segment_catalogue_version
-- History by month and the outcome inbox by time, so old data leaves by dropping whole
-- partitions (README: "Data that stays bounded"). Existing rows are moved in place: this copies
-- both tables under an ACCESS EXCLUSIVE lock, so on a big database plan a window for it (the
-- README gives the rate measured).
--
-- Each partitioned table has a DEFAULT partition: a row whose range has no partition yet (a
-- clock past the prepared months, a record stamped in the future) is still written, and the
-- partition maintenance (the expiry worker) moves it out when it creates that range.

SET LOCAL TimeZone = 'UTC';

-- membership_history: by month of executed_at. The identity key becomes a plain sequence (a
-- partitioned table's unique keys must include the partition key; nothing looks rows up by id,
-- which only orders rows of the same instant).
ALTER TABLE membership_history RENAME TO membership_history_unpartitioned;
ALTER INDEX membership_history_month RENAME TO membership_history_unpartitioned_month;
ALTER INDEX membership_history_user RENAME TO membership_history_unpartitioned_user;
ALTER TABLE membership_history_unpartitioned RENAME CONSTRAINT membership_history_pkey
    TO membership_history_unpartitioned_pkey;
ALTER SEQUENCE membership_history_id_seq RENAME TO membership_history_unpartitioned_id_seq;
CREATE SEQUENCE membership_history_id_seq AS bigint;
CREATE TABLE membership_history (
    id           bigint      NOT NULL DEFAULT nextval('membership_history_id_seq'),
    user_id      bigint      NOT NULL,
    segment_slug text        NOT NULL,
    operation    char(1)     NOT NULL CHECK (operation IN ('I', 'D')),
    executed_at  timestamptz NOT NULL,
    source       text        NOT NULL CHECK (source IN ('manual', 'auto')),
    reason       text        NOT NULL CHECK (reason IN ('manual', 'ttl', 'segment_deleted', 'percent_changed', 'created')),
    command_id   text
) PARTITION BY RANGE (executed_at);
ALTER SEQUENCE membership_history_id_seq OWNED BY membership_history.id;
CREATE TABLE membership_history_default PARTITION OF membership_history DEFAULT;

DO $$
DECLARE
    month date := date_trunc('month', LEAST(
        (SELECT min(executed_at) FROM membership_history_unpartitioned), now()) AT TIME ZONE 'UTC');
    last date := date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months';
BEGIN
    WHILE month <= last LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF membership_history FOR VALUES FROM (%L) TO (%L)',
                       'membership_history_p' || to_char(month, 'YYYYMM'),
                       month::timestamp AT TIME ZONE 'UTC', (month + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        month := month + interval '1 month';
    END LOOP;
END $$;

INSERT INTO membership_history (id, user_id, segment_slug, operation, executed_at, source, reason, command_id)
SELECT id, user_id, segment_slug, operation, executed_at, source, reason, command_id
FROM membership_history_unpartitioned;
DO $$
BEGIN
    PERFORM setval('membership_history_id_seq',
                   COALESCE((SELECT max(id) FROM membership_history_unpartitioned), 0) + 1, false);
END $$;
DROP TABLE membership_history_unpartitioned;
CREATE INDEX membership_history_month ON membership_history (executed_at, user_id, segment_slug);
CREATE INDEX membership_history_user ON membership_history (user_id, executed_at);

-- command_outcomes: by `recorded_at`, the timestamp of the command's Kafka record. A record
-- delivered again has the same timestamp, so two consumers writing the same record's outcome at
-- once meet on this partition's key (command_id, recorded_at) and one of them retries into a
-- replay; the consumer looks a command id up in every partition, so a command re-sent later is
-- found wherever its first outcome is. Rows stored before this migration keep their
-- processed_at as recorded_at, in one partition that is dropped once it is past retention.
ALTER TABLE command_outcomes RENAME TO command_outcomes_unpartitioned;
ALTER TABLE command_outcomes_unpartitioned RENAME CONSTRAINT command_outcomes_pkey
    TO command_outcomes_unpartitioned_pkey;
CREATE TABLE command_outcomes (
    command_id       text        NOT NULL,
    type             text,
    status           text        NOT NULL CHECK (status IN ('applied', 'rejected', 'invalid')),
    error            jsonb,
    result           jsonb,
    processed_at     timestamptz NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    actor            text,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (command_id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE TABLE command_outcomes_default PARTITION OF command_outcomes DEFAULT;

DO $$
DECLARE
    upper_bound timestamptz := now();
BEGIN
    IF EXISTS (SELECT 1 FROM command_outcomes_unpartitioned) THEN
        upper_bound := GREATEST(upper_bound, (SELECT max(processed_at) FROM command_outcomes_unpartitioned)
                                             + interval '1 microsecond');
        EXECUTE format('CREATE TABLE command_outcomes_before_migration PARTITION OF command_outcomes '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', upper_bound);
    END IF;
END $$;

INSERT INTO command_outcomes (command_id, type, status, error, result, processed_at, source_topic,
                              source_partition, source_offset, actor, recorded_at)
SELECT command_id, type, status, error, result, processed_at, source_topic, source_partition, source_offset,
       actor, processed_at
FROM command_outcomes_unpartitioned;
DROP TABLE command_outcomes_unpartitioned;

-- How far back each table still holds data: written by the maintenance when it drops partitions
-- past retention, read by the API to say a month's report is gone (410) rather than empty.
CREATE TABLE retention_horizon (
    table_name     text        PRIMARY KEY,
    dropped_before timestamptz NOT NULL
);
