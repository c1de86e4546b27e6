"""Each segment's explicit members, counted as they change, so that a list of segments shows their
sizes without counting millions of rows: every statement that adds or removes memberships adds
one row per segment it touched, holding the change (statement-level triggers with transition
tables: a batch of thousands of memberships costs a few rows, and writers never update a shared
counter row, so they never wait for each other here). A segment's count is the sum of its rows;
the expiry worker folds them into one row each now and then. Memberships past their expiry
count until the expiry worker removes them, as they stay in the table until then.

Writers go on while it runs. Each trigger is created under a short lock timeout (tried again
until it gets the lock). The counts so far are then added by one statement, whose one snapshot
sees the memberships and the count rows of the same transactions: it adds, per segment, the
members it sees less the count rows it sees, so that with the rows of every later change the sum
is exact, without holding a lock while it counts. For the same reason a re-run after a crash
adds nothing.
"""

from yoyo import step

from shared.schema_changes import briefly

__depends__ = {"0009_console_indexes"}
__transactional__ = False

FUNCTIONS = """
CREATE OR REPLACE FUNCTION count_memberships_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members)
    SELECT segment_id, count(*) FROM added GROUP BY segment_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION count_memberships_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members)
    SELECT segment_id, -count(*) FROM removed GROUP BY segment_id;
    RETURN NULL;
END $$;
"""

# An upsert's updated rows are in neither: an update keeps its membership.
TRIGGERS = (
    """CREATE OR REPLACE TRIGGER memberships_counted_in AFTER INSERT ON memberships
       REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_memberships_added()""",
    """CREATE OR REPLACE TRIGGER memberships_counted_out AFTER DELETE ON memberships
       REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION count_memberships_removed()""",
)

COUNTS_SO_FAR = """
INSERT INTO segment_member_counts (segment_id, members)
SELECT segment_id, sum(members) FROM (
    SELECT segment_id, count(*) AS members FROM memberships GROUP BY segment_id
    UNION ALL
    SELECT segment_id, -sum(members) FROM segment_member_counts GROUP BY segment_id) AS seen
GROUP BY segment_id
HAVING sum(members) <> 0
"""


def apply(conn) -> None:
    cursor = conn.cursor()
    cursor.execute("""
        CREATE TABLE IF NOT EXISTS segment_member_counts (
            segment_id bigint NOT NULL,
            members    bigint NOT NULL)""")
    cursor.execute("CREATE INDEX IF NOT EXISTS segment_member_counts_segment ON segment_member_counts (segment_id)")
    cursor.execute(FUNCTIONS)
    for trigger in TRIGGERS:
        briefly(cursor, trigger)
    cursor.execute(COUNTS_SO_FAR)


def rollback(conn) -> None:
    cursor = conn.cursor()
    briefly(cursor, "DROP TRIGGER IF EXISTS memberships_counted_in ON memberships")
    briefly(cursor, "DROP TRIGGER IF EXISTS memberships_counted_out ON memberships")
    cursor.execute("DROP FUNCTION IF EXISTS count_memberships_added(), count_memberships_removed()")
    cursor.execute("DROP TABLE IF EXISTS segment_member_counts")


steps = [step(apply, rollback)]
