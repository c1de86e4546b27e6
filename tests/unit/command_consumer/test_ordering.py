"""A user batch waits for the segment batches in hand that name a segment it names, and only those."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson

from services.command_consumer.ordering import SegmentBarrier, named_slugs


def records(*commands) -> list:
    return [SimpleNamespace(value=command if isinstance(command, bytes) else orjson.dumps(command))
            for command in commands]


def test_the_slugs_a_record_names_and_unreadable_records():
    assert named_slugs(records({"type": "delete_segment", "slug": "BIG"})) == {"BIG"}
    assert named_slugs(records({"type": "update_user_segments", "user_id": 1, "add": ["A"], "remove": ["B"]},
                               {"type": "create_user", "user_id": 2})) == {"A", "B"}
    assert named_slugs(records(b"not json")) is None
    assert named_slugs(records([1, 2])) is None
    assert named_slugs(records({"type": "update_user_segments", "add": "A"})) is None  # not a list: unknown
    assert named_slugs([SimpleNamespace(value=None)]) is None


async def test_a_user_batch_waits_only_for_segment_batches_that_share_a_slug():
    barrier = SegmentBarrier()
    assert barrier.for_users(records({"add": ["A"]})) == set()  # nothing in hand
    hold = asyncio.Event()
    deleting = asyncio.create_task(hold.wait())
    unreadable = asyncio.create_task(hold.wait())
    barrier.started(deleting, records({"type": "delete_segment", "slug": "BIG"}))
    assert barrier.for_users(records({"add": ["OTHER"]}, {"type": "create_user", "user_id": 5})) == set()
    assert barrier.for_users(records({"add": ["OTHER"]}, {"remove": ["BIG"]})) == {deleting}
    assert barrier.for_users(records(b"garbage")) == {deleting}  # unknown: waits for everything
    barrier.started(unreadable, records(b"garbage"))
    assert barrier.for_users(records({"add": ["OTHER"]})) == {unreadable}
    hold.set()
    await asyncio.gather(deleting, unreadable)
    await asyncio.sleep(0)  # done callbacks run
    assert barrier.for_users(records({"remove": ["BIG"]})) == set()
