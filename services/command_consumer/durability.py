"""Whether the primary acknowledges the consumer's commits only once a synchronous standby has
them. The consumer commits a command's Kafka offset once its transaction is acknowledged; a
transaction acknowledged by the primary alone vanishes if that primary dies before its standby
has it, and with its offset committed the command is lost for good (docs/operations.md, Highly
available PostgreSQL).

HA engines drop synchronous replication while the standby is away (pg_auto_failover's
`wait_primary`, Patroni's non-strict synchronous mode): writes go on, acknowledged by one server.
The consumer goes on as well, as the engine chose, and makes it visible: the gauge
`segmentation_db_commits_synchronous` (0 while one server acknowledges), and a warning each time it
changes to that while DB_EXPECT_SYNCHRONOUS_COMMIT is true. An operator who prefers writes to stop
instead sets the engine's strict mode, which is where that choice can be enforced."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from prometheus_client import Gauge

from shared.db import TRANSIENT_DB_ERRORS

log = structlog.get_logger("command_consumer")

SYNCHRONOUS = Gauge("segmentation_db_commits_synchronous",
                    "1 when the primary acknowledges the consumer's commits only once a synchronous standby has them, "
                    "0 when the primary alone acknowledges them")
EXPECTED = Gauge("segmentation_db_synchronous_commit_expected",
                 "1 when DB_EXPECT_SYNCHRONOUS_COMMIT says commits must reach a standby before they are acknowledged")

# Both settings as the consumer's own sessions see them: synchronous_commit may be set per role or
# database, and an empty synchronous_standby_names means no standby is waited for.
SETTINGS_SQL = ("SELECT current_setting('synchronous_standby_names') AS standbys, "
                "current_setting('synchronous_commit') AS level")
WAITING_LEVELS = frozenset({"on", "remote_write", "remote_apply"})


def acknowledged_by_a_standby(standbys: str, level: str) -> bool:
    return bool(standbys.strip()) and level in WAITING_LEVELS


async def commits_synchronous(pool: asyncpg.Pool) -> bool:
    row = await pool.fetchrow(SETTINGS_SQL)
    return acknowledged_by_a_standby(row["standbys"], row["level"])


async def watch(pool: asyncpg.Pool, *, expected: bool, every: float) -> None:
    """Measures every `every` seconds until cancelled; an unreachable database keeps the last value."""
    EXPECTED.set(1 if expected else 0)
    last: bool | None = None
    while True:
        try:
            synchronous = await asyncio.wait_for(commits_synchronous(pool), max(every, 1.0))
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as error:
            log.debug("commit durability not measured", error=repr(error))
        else:
            SYNCHRONOUS.set(1 if synchronous else 0)
            if synchronous != last:
                if synchronous:
                    log.info("commits acknowledged by a synchronous standby too")
                elif expected:
                    log.warning("commits acknowledged by the primary alone: a failover now can lose applied "
                                "commands (DB_EXPECT_SYNCHRONOUS_COMMIT is true)")
                else:
                    log.info("commits acknowledged by the primary alone")
                last = synchronous
        await asyncio.sleep(every)
