"""Handlers of the segment commands (README: "The contract, in short", Commands), each a few
statements in the batch's transaction.

Each reads its clock only once it holds the segment's row lock. User batches share-lock the
segments they name and read theirs after, so a segment command and a user batch touching the
same segment are stamped in the order they were applied: reports compare those times to tell
whom a rollout event moved (repository.record_rollout_event).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import asyncpg

from services.command_consumer import repository
from services.command_consumer.users import Decision
from shared.commands import CreateSegment, DeleteSegment, UpdateSegment
from shared.outcomes import ErrorCode, Status


def _not_found(slug: str) -> Decision:
    return Decision(Status.REJECTED, error_code=ErrorCode.SEGMENT_NOT_FOUND, error_message=f"no live segment {slug}")


def _segment_result(slug: str, percent, description: str | None) -> dict:
    return {"slug": slug, "percent": float(percent), "description": description}


Clock = Callable[[], datetime]


async def create_segment(conn: asyncpg.Connection, command: CreateSegment, clock: Clock,
                         command_id: str, removal_chunk: int | None = None) -> Decision:
    if await repository.find_live_segment(conn, command.slug):
        return Decision(Status.REJECTED, error_code=ErrorCode.SEGMENT_EXISTS,
                        error_message=f"segment {command.slug} already exists")
    now = clock()
    segment_id = await repository.insert_segment(conn, command.slug, command.percent, command.description, now)
    if command.percent > 0:
        await repository.record_rollout_event(conn, segment_id, command.slug, 0, command.percent,
                                              "created", now, command_id)
    return Decision(Status.APPLIED, result=_segment_result(command.slug, command.percent, command.description),
                    at=now)


async def update_segment(conn: asyncpg.Connection, command: UpdateSegment, clock: Clock,
                         command_id: str, removal_chunk: int | None = None) -> Decision:
    segment = await repository.find_live_segment(conn, command.slug)
    if segment is None:
        return _not_found(command.slug)
    now = clock()
    percent = segment["percent"] if command.percent is None else command.percent
    description = segment["description"] if command.description is None else command.description
    await repository.update_segment(conn, segment["id"], percent, description, now)
    if percent != segment["percent"]:
        await repository.record_rollout_event(conn, segment["id"], command.slug, segment["percent"], percent,
                                              "percent_changed", now, command_id)
    return Decision(Status.APPLIED, result=_segment_result(command.slug, percent, description), at=now)


async def delete_segment(conn: asyncpg.Connection, command: DeleteSegment, clock: Clock,
                         command_id: str, removal_chunk: int | None = None) -> Decision:
    """Deleted at `now`. Its explicit members leave at once when they fit in `removal_chunk` (or
    it is None); otherwise in chunks after the batch, so that the batch, and every command
    behind it in its partition, does not wait for millions of rows."""
    segment = await repository.find_live_segment(conn, command.slug)
    if segment is None:
        return _not_found(command.slug)
    now = clock()
    if segment["percent"] > 0:  # first: the exclusions and members removed below end their spans after it
        await repository.record_rollout_event(conn, segment["id"], command.slug, segment["percent"], 0,
                                              "segment_deleted", now, command_id)
    await repository.mark_deleted(conn, segment["id"], now)
    if removal_chunk is not None and await repository.members_beyond(conn, segment["id"], removal_chunk):
        return Decision(Status.APPLIED, removal=(segment["id"], command.slug), at=now)
    removed = await repository.remove_members(conn, segment["id"], command.slug, now, command_id)
    return Decision(Status.APPLIED, result=deleted_result(command.slug, removed), at=now)


def deleted_result(slug: str, removed: int) -> dict:
    return {"slug": slug, "explicit_members_removed": removed}


SEGMENT_HANDLERS = {
    CreateSegment: create_segment,
    UpdateSegment: update_segment,
    DeleteSegment: delete_segment,
}
