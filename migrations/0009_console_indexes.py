"""Indexes for the console's segment page, built without blocking the writers: a segment's daily
entries and exits, and its members at the start of a period, come from its history rows
(membership_history by segment and time, with the operation for index-only scans), and its most
recent members from memberships by segment and time added.

CREATE INDEX CONCURRENTLY cannot run in a transaction, so this migration runs without one: each
partition of the history gets its index concurrently and is then attached to the partitioned
index, which becomes valid once every partition has one (partitions made later inherit it). A
run stopped halfway is picked up by the next: every statement is IF NOT EXISTS, and an index
left invalid by an interrupted build is dropped and built again.
"""

from yoyo import step

__depends__ = {"0008_outcome_subject"}
__transactional__ = False

HISTORY_INDEX = "membership_history_segment"
MEMBERS_INDEX = "memberships_segment_recent"


def _invalid(cursor, name: str) -> bool:
    cursor.execute("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,))
    row = cursor.fetchone()
    return bool(row and row[0])


def _concurrently(cursor, name: str, definition: str) -> None:
    if _invalid(cursor, name):
        cursor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
    cursor.execute(f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{name}" ON {definition}')


def apply(conn) -> None:
    cursor = conn.cursor()
    cursor.execute(f"CREATE INDEX IF NOT EXISTS {HISTORY_INDEX} ON ONLY membership_history "
                   "(segment_slug, executed_at) INCLUDE (operation)")
    cursor.execute("""
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'membership_history'::regclass AND NOT EXISTS (
            SELECT 1 FROM pg_inherits ii WHERE ii.inhparent = %s::regclass
              AND ii.inhrelid IN (SELECT indexrelid FROM pg_index WHERE indrelid = c.oid))
        ORDER BY c.relname""", (HISTORY_INDEX,))
    for (partition,) in cursor.fetchall():
        index = f"{partition}_segment"
        _concurrently(cursor, index, f'"{partition}" (segment_slug, executed_at) INCLUDE (operation)')
        cursor.execute(f'ALTER INDEX {HISTORY_INDEX} ATTACH PARTITION "{index}"')
    # Its prefix serves every look-up by segment that memberships_segment served.
    _concurrently(cursor, MEMBERS_INDEX, "memberships (segment_id, added_at DESC, user_id DESC)")
    cursor.execute("DROP INDEX CONCURRENTLY IF EXISTS memberships_segment")


def rollback(conn) -> None:
    cursor = conn.cursor()
    cursor.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS memberships_segment ON memberships (segment_id)")
    cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {MEMBERS_INDEX}")
    cursor.execute(f"DROP INDEX IF EXISTS {HISTORY_INDEX}")


steps = [step(apply, rollback)]
