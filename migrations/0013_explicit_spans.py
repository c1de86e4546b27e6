"""A percent change costs the same whatever the size of its segment.

Until now each rollout event copied the users it did not move (every explicit member and every
excluded user of its segment at that moment) into rollout_event_overrides, in the command's
transaction: a cost that grew with the segment's explicit members. From here on an event is
two rows (the event, and its segment's `rolled_at`), and reports find whom it did not move from
the rows that held at its time: memberships by their added_at and expiry, exclusions by their
excluded_at, and rows that have ended since, kept in explicit_spans. Every writer that ends an
explicit row (a removal, a re-add that restarts it, an expiry, a deletion) keeps its span when
the segment's `rolled_at` is at or after the row's start, so segments never rolled out keep none.

Events recorded before this migration keep their lists (`overrides_kept`, true for them by the
column's default; the new consumer writes false). Run the new consumers and expiry workers in
place of the old ones, not beside them: an old one ends rows without keeping their spans.

Rolling back leaves the events recorded since with no list: reports would show them moving
every user.

Each statement that changes a table the writers use waits at most a second for its lock and is
tried again (shared.schema_changes.briefly); the rest takes no lock a writer waits for.
"""

from yoyo import step

from shared.schema_changes import briefly

__depends__ = {"0012_segment_removals"}
__transactional__ = False


def apply(conn) -> None:
    cursor = conn.cursor()
    cursor.execute("""
        CREATE TABLE IF NOT EXISTS explicit_spans (
            segment_id bigint      NOT NULL,
            user_id    bigint      NOT NULL,
            since      timestamptz NOT NULL,
            ended      timestamptz NOT NULL)""")
    cursor.execute("CREATE INDEX IF NOT EXISTS explicit_spans_segment_user ON explicit_spans (segment_id, user_id)")
    cursor.execute("COMMENT ON TABLE explicit_spans IS 'explicit memberships and exclusions that ended, "
                   "from since until just before ended, kept for the rollout events they span'")
    briefly(cursor, "ALTER TABLE segments ADD COLUMN IF NOT EXISTS rolled_at timestamptz")
    # Catalog-only: the rows already there read true, without a rewrite.
    briefly(cursor, "ALTER TABLE rollout_events ADD COLUMN IF NOT EXISTS overrides_kept boolean NOT NULL DEFAULT true")


def rollback(conn) -> None:
    cursor = conn.cursor()
    briefly(cursor, "ALTER TABLE rollout_events DROP COLUMN IF EXISTS overrides_kept")
    briefly(cursor, "ALTER TABLE segments DROP COLUMN IF EXISTS rolled_at")
    cursor.execute("DROP TABLE IF EXISTS explicit_spans")


steps = [step(apply, rollback)]
