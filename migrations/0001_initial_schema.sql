-- The whole contract's schema: segments (live and deleted), users, explicit memberships,
-- rollout exclusions, rollout events, membership history and command outcomes.

CREATE TABLE segments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug        text          NOT NULL,
    percent     numeric(5, 2) NOT NULL DEFAULT 0 CHECK (percent BETWEEN 0 AND 100),
    description text,
    created_at  timestamptz   NOT NULL,
    updated_at  timestamptz   NOT NULL,
    deleted_at  timestamptz
);
-- One live segment per slug; a deleted slug can be created again.
CREATE UNIQUE INDEX segments_live_slug ON segments (slug) WHERE deleted_at IS NULL;
CREATE INDEX segments_live_rollout ON segments (id) WHERE deleted_at IS NULL AND percent > 0;

CREATE TABLE users (
    user_id       bigint      PRIMARY KEY CHECK (user_id > 0),
    registered_at timestamptz NOT NULL
);

-- Explicit memberships from update_user_segments; expires_at NULL means permanent.
CREATE TABLE memberships (
    user_id    bigint      NOT NULL,
    segment_id bigint      NOT NULL REFERENCES segments (id),
    added_at   timestamptz NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (user_id, segment_id)
);
CREATE INDEX memberships_expiry ON memberships (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX memberships_segment ON memberships (segment_id);

-- A user explicitly removed from a segment whose rollout covers it stays out until an explicit add.
CREATE TABLE rollout_exclusions (
    user_id     bigint      NOT NULL,
    segment_id  bigint      NOT NULL REFERENCES segments (id),
    excluded_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, segment_id)
);

-- Percent changes of a segment (created, percent changed, deleted). Reports derive the
-- rollout's entries and exits per user from these, so no row per covered user is stored.
CREATE TABLE rollout_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    segment_id   bigint        NOT NULL REFERENCES segments (id),
    segment_slug text          NOT NULL,
    old_percent  numeric(5, 2) NOT NULL,
    new_percent  numeric(5, 2) NOT NULL,
    reason       text          NOT NULL CHECK (reason IN ('created', 'percent_changed', 'segment_deleted')),
    executed_at  timestamptz   NOT NULL,
    command_id   text          NOT NULL
);
CREATE INDEX rollout_events_executed_at ON rollout_events (executed_at);

-- Every explicit entry and exit (rollout ones are derived from rollout_events).
CREATE TABLE membership_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      bigint      NOT NULL,
    segment_slug text        NOT NULL,
    operation    char(1)     NOT NULL CHECK (operation IN ('I', 'D')),
    executed_at  timestamptz NOT NULL,
    source       text        NOT NULL CHECK (source IN ('manual', 'auto')),
    reason       text        NOT NULL CHECK (reason IN ('manual', 'ttl', 'segment_deleted', 'percent_changed', 'created')),
    command_id   text
);
CREATE INDEX membership_history_month ON membership_history (executed_at, user_id, segment_slug);
CREATE INDEX membership_history_user ON membership_history (user_id, executed_at);

-- The idempotency inbox: one outcome per command id, written in the command's transaction.
CREATE TABLE command_outcomes (
    command_id       text        PRIMARY KEY,
    type             text,
    status           text        NOT NULL CHECK (status IN ('applied', 'rejected', 'invalid')),
    error            jsonb,
    result           jsonb,
    processed_at     timestamptz NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL
);
