"""Applies one partition's batch of records in one transaction, each command atomic and in order.

Commands already in the outcome inbox are not applied again: their stored outcome is returned so
the consumer can publish it again (exactly-once effect, at-least-once outcome).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from services.command_consumer import repository
from services.command_consumer.parsing import InvalidRecord, ParsedRecord, ValidCommand
from services.command_consumer.segments import SEGMENT_HANDLERS
from services.command_consumer.users import USER_HANDLERS, Decision
from shared.commands import CreateUser, DeleteSegment, UpdateUserSegments
from shared.db import TRANSIENT_DB_ERRORS
from shared.membership import UserState
from shared.outcomes import ErrorCode, OutcomeRow, Status

USER_COMMANDS = frozenset({CreateUser, UpdateUserSegments})


@dataclass(slots=True)
class Processed:
    parsed: ParsedRecord
    outcome: OutcomeRow
    replayed: bool  # the outcome was stored before: nothing was applied this time
    # Applied, but its outcome is not stored yet (a segment whose members are removed in chunks:
    # `outcome` is its draft, without the result). Not published; its offset is held back.
    pending: bool = False


def _clock() -> datetime:
    return datetime.now(UTC)


def _outcome(parsed: ParsedRecord, decision: Decision | None, now: datetime) -> OutcomeRow:
    record = parsed.record
    user_id = slug = None
    if isinstance(parsed, InvalidRecord):
        status, result, kind, actor = Status.INVALID, None, parsed.type, None
        error = {"code": parsed.code, "message": parsed.message}
    else:
        command = parsed.command
        status, result, kind, actor = decision.status, decision.result, command.type, command.actor
        error = {"code": decision.error_code, "message": decision.error_message} if decision.error_code else None
        user_id, slug = getattr(command, "user_id", None), getattr(command, "slug", None)
    return OutcomeRow(parsed.command_id, kind, str(status), error, result, now, record.topic, record.partition,
                      record.offset, actor, recorded_at(record, now), user_id, slug)


def recorded_at(record, now: datetime) -> datetime:
    """The inbox's partition key: the record's timestamp (the same every time the record is
    delivered), or the time it is processed for a record without one."""
    if record.timestamp_ms is None or record.timestamp_ms < 0:
        return now
    return datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)


def _too_old(parsed: ValidCommand, now: datetime, window_seconds: int) -> Decision:
    age = (now - recorded_at(parsed.record, now)).total_seconds()
    return Decision(Status.REJECTED, error_code=str(ErrorCode.TOO_OLD), error_message=(
        f"the command's record is {age:,.0f}s old, older than the outcome window (OUTCOME_RETENTION, "
        f"{window_seconds:,}s): whether it was applied before can no longer be checked, so it is not applied"))


def _older_than(batch: list[ParsedRecord], window_seconds: int) -> set[int]:
    """Indexes of the records older than the window (one pass for the oldest timestamp first: a
    batch almost never holds one)."""
    cutoff_ms = (_clock().timestamp() - window_seconds) * 1000
    stamps = [parsed.record.timestamp_ms for parsed in batch]
    if min((stamp for stamp in stamps if stamp is not None and stamp >= 0), default=cutoff_ms) >= cutoff_ms:
        return set()
    return {index for index, stamp in enumerate(stamps) if stamp is not None and 0 <= stamp < cutoff_ms}


@contextlib.asynccontextmanager
async def _transaction(conn: asyncpg.Connection, lock_timeout_ms: int | None) -> AsyncIterator[None]:
    """A transaction; with `lock_timeout_ms`, one whose row-lock waits end in LockNotAvailableError
    after that long (set in the same round trip as BEGIN)."""
    if lock_timeout_ms is None:
        async with conn.transaction():
            yield
        return
    await conn.execute(f"BEGIN; SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


async def apply_batch(conn: asyncpg.Connection, batch: list[ParsedRecord],
                      window_seconds: int | None = None, lock_timeout_ms: int | None = None,
                      removal_chunk: int | None = None) -> list[Processed]:
    """Apply parsed records (a partition's, or a few partitions' each in its order), in order, in
    one transaction; return their outcomes. `lock_timeout_ms`: see _transaction.
    `removal_chunk`: a deleted segment with more explicit members than this has them removed in
    chunks afterwards (segment_removals), its outcome pending until then; None: at once.

    A record older than `window_seconds` (the inbox window, OUTCOME_RETENTION) is not looked up
    nor applied: its inbox partition may be gone, so it is rejected `too_old`, and not stored
    (its outcome would belong to a dropped range). Nor is an invalid record that old stored.

    The users the batch names are loaded once and locked, every command is decided in memory
    against that state in record order (a rejected command changes nothing), and then the changed
    memberships, the history and the new outcomes are written in a few set-based statements.
    A command whose id is already in the inbox, stored before or earlier in this batch, is not
    applied again: its outcome comes back marked `replayed`. Nothing is visible to anyone until
    the transaction commits, and on any error nothing of the batch is.
    """
    stale = _older_than(batch, window_seconds) if window_seconds is not None else set()
    checked = [p for index, p in enumerate(batch) if index not in stale] if stale else batch
    async with _transaction(conn, lock_timeout_ms):
        stored = await repository.fetch_outcomes(conn, list({p.command_id for p in checked}))
        deletions = [p.command_id for p in checked if isinstance(p, ValidCommand) and type(p.command) is DeleteSegment
                     and p.command_id not in stored]
        pending = await repository.pending_removals(conn, deletions) if deletions else set()
        # Exact type checks: the command models' metaclass is an ABCMeta, whose isinstance is slow.
        fresh_user_commands = [p for p in checked if isinstance(p, ValidCommand) and p.command_id not in stored
                               and type(p.command) in USER_COMMANDS]
        states: dict[int, UserState] = {}
        segments = {}
        if fresh_user_commands:
            user_ids = sorted({p.command.user_id for p in fresh_user_commands})
            pairs = sorted({(p.command.user_id, slug) for p in fresh_user_commands
                            if type(p.command) is UpdateUserSegments for slug in (*p.command.add, *p.command.remove)})
            segments, states = await repository.load_batch_state(conn, user_ids, pairs)

        processed: list[Processed] = []
        new_outcomes: dict[str, OutcomeRow] = {}
        history = []
        catalogue_changed = False
        for index, parsed in enumerate(batch):
            if stale and index in stale:  # decided without the inbox, and not stored
                now = _clock()
                decision = _too_old(parsed, now, window_seconds) if isinstance(parsed, ValidCommand) else None
                processed.append(Processed(parsed, _outcome(parsed, decision, now), False))
                continue
            if parsed.command_id in stored:
                processed.append(Processed(parsed, stored[parsed.command_id], True))
                continue
            if parsed.command_id in new_outcomes:  # the same id twice in one batch
                processed.append(Processed(parsed, new_outcomes[parsed.command_id], True))
                continue
            if parsed.command_id in pending:  # its removal goes on; the outcome comes with its end
                processed.append(Processed(parsed, _outcome(parsed, Decision(Status.APPLIED), _clock()), True, True))
                continue
            now = _clock()
            decision = None
            if isinstance(parsed, ValidCommand):
                command = parsed.command
                if type(command) in USER_HANDLERS:
                    decision = USER_HANDLERS[type(command)](command, states[command.user_id], segments, now,
                                                            parsed.command_id)
                else:
                    decision = await SEGMENT_HANDLERS[type(command)](conn, command, _clock, parsed.command_id,
                                                                     removal_chunk)
                    now = decision.at or now
                    catalogue_changed |= decision.status is Status.APPLIED
                history.extend(decision.history)
                if decision.removal is not None:
                    draft = _outcome(parsed, decision, now)
                    await repository.queue_removal(conn, draft, *decision.removal, now,
                                                   parsed.record.header("traceparent"))
                    pending.add(parsed.command_id)
                    processed.append(Processed(parsed, draft, False, True))
                    continue
            outcome = _outcome(parsed, decision, now)
            new_outcomes[parsed.command_id] = outcome
            processed.append(Processed(parsed, outcome, False))

        if catalogue_changed:
            await repository.bump_catalogue_version(conn)
        await repository.write_batch(conn, list(states.values()), history, list(new_outcomes.values()), _clock())
    return processed
