-- depends: 0011_segment_member_days
-- A deleted segment's explicit members still to remove. Deleting a segment marks it deleted in the
-- command's own transaction (reads and commands no longer see it from then on); when it has more
-- members than one chunk, they are removed afterwards in chunks of their own transactions, each
-- writing the history of exactly the rows it removed, and the command's outcome is stored only
-- with the last chunk. `outcome` holds the outcome's fields known when the command was applied
-- (its source, actor, inbox key); `done_at` is set with the outcome stored, and the row goes
-- once that outcome is published. The consumer holds the command's offset uncommitted until then.
-- (`last_added_at`, `last_user_id`): where the last chunk ended in the segment's index order, so
-- the next one starts there instead of stepping over the index entries of every removed row.
CREATE TABLE segment_removals (
    command_id  text        PRIMARY KEY,
    segment_id  bigint      NOT NULL,
    slug        text        NOT NULL,
    deleted_at  timestamptz NOT NULL,
    removed     bigint      NOT NULL DEFAULT 0,
    last_added_at timestamptz,
    last_user_id  bigint,
    done_at     timestamptz,
    traceparent bytea,
    outcome     jsonb       NOT NULL
);
