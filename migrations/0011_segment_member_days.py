"""Each segment's explicit members, day by day: the change of its size on each UTC day, kept as
memberships change, so that the list of segments draws a 30-day trend for every row without
reading the history.

The count triggers of 0010 now tag each change with the day of the transaction that made it;
the expiry worker, folding the counts, adds each segment's tagged changes to its day in
segment_member_days and drops days no trend reaches any more. A segment's size at the end of a
past day is its size now less the changes of the days since.

Days before this migration come from the history (one aggregate over the last few weeks, its
segment found by slug and lifetime), marked done in the table's comment so that a re-run after
a crash does not add them twice. No step waits long on a lock the writers need: the new column
is added under a short lock timeout (tried again until it gets the lock), the functions are
replaced in place (no lock on memberships), and the aggregate runs outside any lock. Changes
committed between the new functions and the aggregate's snapshot with a history time before
today would be counted in both; only the expiry's exits are written with an earlier time, by
seconds, so that happens only at midnight.
"""

from yoyo import step

from shared.schema_changes import briefly

__depends__ = {"0010_segment_member_counts"}
__transactional__ = False

BACKFILL_DAYS = 31
DONE = "days from the history added before %s"

TAGGED_FUNCTIONS = """
CREATE OR REPLACE FUNCTION count_memberships_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members, day)
    SELECT segment_id, count(*), (now() AT TIME ZONE 'UTC')::date FROM added GROUP BY segment_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION count_memberships_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members, day)
    SELECT segment_id, -count(*), (now() AT TIME ZONE 'UTC')::date FROM removed GROUP BY segment_id;
    RETURN NULL;
END $$;
"""

UNTAGGED_FUNCTIONS = TAGGED_FUNCTIONS.replace(", day)", ")").replace(", (now() AT TIME ZONE 'UTC')::date", "")

BACKFILL = """
INSERT INTO segment_member_days (segment_id, day, change)
SELECT s.id, (h.executed_at AT TIME ZONE 'UTC')::date,
       sum(CASE h.operation WHEN 'I' THEN 1 ELSE -1 END)
FROM membership_history h
JOIN segments s ON s.slug = h.segment_slug AND h.executed_at >= s.created_at
                   AND (s.deleted_at IS NULL OR h.executed_at <= s.deleted_at)
WHERE h.executed_at >= %(today)s::date - %(days)s AND h.executed_at < %(today)s::date
GROUP BY 1, 2
ON CONFLICT (segment_id, day) DO UPDATE SET change = segment_member_days.change + excluded.change
"""


def apply(conn) -> None:
    cursor = conn.cursor()
    briefly(cursor, "ALTER TABLE segment_member_counts ADD COLUMN IF NOT EXISTS day date")
    cursor.execute("""
        CREATE TABLE IF NOT EXISTS segment_member_days (
            segment_id bigint NOT NULL,
            day        date   NOT NULL,
            change     bigint NOT NULL,
            PRIMARY KEY (segment_id, day))""")
    cursor.execute("CREATE INDEX IF NOT EXISTS segment_member_days_day ON segment_member_days (day)")
    cursor.execute(TAGGED_FUNCTIONS)
    cursor.execute("SELECT (now() AT TIME ZONE 'UTC')::date, obj_description('segment_member_days'::regclass)")
    today, comment = cursor.fetchone()
    if comment and comment.startswith(DONE.split("%")[0]):
        return
    cursor.execute("BEGIN")
    cursor.execute(BACKFILL, {"today": today, "days": BACKFILL_DAYS})
    cursor.execute(f"COMMENT ON TABLE segment_member_days IS '{DONE % today.isoformat()}'")
    cursor.execute("COMMIT")


def rollback(conn) -> None:
    cursor = conn.cursor()
    cursor.execute(UNTAGGED_FUNCTIONS)
    cursor.execute("DROP TABLE IF EXISTS segment_member_days")
    briefly(cursor, "ALTER TABLE segment_member_counts DROP COLUMN IF EXISTS day")


steps = [step(apply, rollback)]
