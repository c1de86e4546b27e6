"""What migrations share when they change a table the writers use while the service runs."""

from __future__ import annotations

import time

LOCK_NOT_AVAILABLE = "55P03"


def briefly(cursor, statement: str, attempts: int = 600) -> None:
    """Run a statement that needs a lock the writers also take, giving up on the lock after a
    second (so writers queued behind it wait no longer) and trying again, half a second later,
    up to `attempts` times."""
    cursor.execute("SET lock_timeout = '1s'")
    try:
        for attempt in range(attempts):
            try:
                cursor.execute(statement)
                return
            except Exception as error:  # psycopg.errors.LockNotAvailable; yoyo hides the driver
                if getattr(error, "sqlstate", None) != LOCK_NOT_AVAILABLE or attempt == attempts - 1:
                    raise
                time.sleep(0.5)
    finally:
        cursor.execute("RESET lock_timeout")
