"""The topics of the contract as a FastStream app, from which the AsyncAPI document is generated.

The command consumer itself runs on aiokafka: it needs per-partition batches in one transaction,
manual commits after the outcome is durable and commit-on-revoke, which FastStream's subscriber
hides. This app declares the same channels with the same pydantic models the consumer validates
with, so the document cannot drift from the code. Regenerate `docs/asyncapi.yaml` with
`make asyncapi`; a test fails when the committed copy is stale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated

import yaml
from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from faststream.specification.asyncapi.site import get_asyncapi_html
from faststream.specification.base import Specification
from pydantic import Field

from shared.changes import MembershipChange, RolloutChange
from shared.commands import CreateSegment, CreateUser, DeleteSegment, UpdateSegment, UpdateUserSegments
from shared.outcomes import Outcome
from shared.settings import KafkaSettings

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
DEFAULT_SERVER = "kafka:9092"

SegmentCommand = Annotated[CreateSegment | UpdateSegment | DeleteSegment, Field(discriminator="type")]
UserCommand = Annotated[CreateUser | UpdateUserSegments, Field(discriminator="type")]

RESULT_HEADERS = ("Headers `command-id`, `command-type`, `status`; the command's `traceparent` header "
                  "is copied over.")
CHANGE_HEADERS = ("Headers `event-kind` (`membership` or `rollout`) and `event-id`. Published by the change "
                  "publisher from the outbox each change writes in its own transaction: only committed changes, "
                  "each at least once with a stable `event_id` (deduplicate by it), one user's events in the "
                  "order they committed.")
DLQ_HEADERS = ("Key and value are the original record's bytes. String headers: `x-error-code`, "
               "`x-error-message`, `x-original-topic`, `x-original-partition`, `x-original-offset`.")


async def apply_segment_command(command: SegmentCommand) -> Outcome:
    raise NotImplementedError("documentation only: services.command_consumer applies commands")


async def apply_user_command(command: UserCommand) -> Outcome:
    raise NotImplementedError("documentation only: services.command_consumer applies commands")


def build_app(settings: KafkaSettings) -> FastStream:
    broker = KafkaBroker(settings.kafka_bootstrap_servers or DEFAULT_SERVER,
                         description="Commands in, one outcome per command out.")
    results = broker.publisher(
        settings.results_topic, schema=Outcome, title=f"{settings.results_topic}:Outcome",
        description="One outcome per consumed command, keyed by command id. " + RESULT_HEADERS)
    dead_letters = broker.publisher(
        settings.dlq_topic, schema=bytes, title=f"{settings.dlq_topic}:DeadLetter",
        description="Records that could not be parsed or validated. " + DLQ_HEADERS)

    for topic, kind, handler, description in (
            (settings.segments_commands_topic, "SegmentCommand", apply_segment_command,
             "Segment commands keyed by the segment slug (UTF-8), so each segment's commands keep their order."),
            (settings.assignments_commands_topic, "UserCommand", apply_user_command,
             "User commands keyed by the user id as a decimal string, so each user's commands keep their order.")):
        subscriber = broker.subscriber(topic, group_id=settings.consumer_group, title=f"{topic}:{kind}",
                                       description=description)
        results(dead_letters(subscriber(handler)))

    changes = settings.membership_changes_topic
    for schema, kind, key in ((MembershipChange, "MembershipChange", "the user id as a decimal string"),
                              (RolloutChange, "RolloutChange", "`segment:<slug>`")):
        broker.publisher(changes, schema=schema, title=f"{changes}:{kind}",
                         description=f"{schema.__doc__} Keyed by {key}. {CHANGE_HEADERS}")

    return FastStream(broker, specification=AsyncAPI(
        title="User segmentation service: command and membership-change topics",
        version="1.0.0",
        description="Producers publish commands; the command consumer applies each exactly once in effect "
                    "and publishes its outcome. Invalid records go to the DLQ. Every entry, exit and rollout "
                    "change is published on the membership-changes topic.",
    ))


def specification(settings: KafkaSettings) -> Specification:
    spec = build_app(settings).schema.to_specification()
    # FastStream assumes its own correlation_id header; say where this contract carries the id.
    for name, message in spec.components.messages.items():
        if name.startswith(f"{settings.results_topic}:"):
            message.correlationId.location = "$message.header#/command-id"
        elif name.startswith(f"{settings.dlq_topic}:"):
            message.correlationId = None
        elif name.startswith(f"{settings.membership_changes_topic}:"):
            message.correlationId.location = "$message.header#/event-id"
        else:
            message.correlationId.location = "$message.payload#/command_id"
    return spec


def document(settings: KafkaSettings) -> dict:
    """The document as plain data, its channels, operations, messages and schemas in name order
    (FastStream's order varies between runs; a committed file should not)."""
    data = specification(settings).to_jsonable()
    for section in (data, data.get("components", {})):
        for key in ("channels", "operations", "messages", "schemas"):
            if isinstance(section.get(key), dict):
                section[key] = dict(sorted(section[key].items()))
    return data


def document_yaml(settings: KafkaSettings) -> str:
    return yaml.safe_dump(document(settings), sort_keys=False, allow_unicode=True, width=100)


def document_json(settings: KafkaSettings) -> str:
    return json.dumps(document(settings), indent=2, ensure_ascii=False)


def document_html(settings: KafkaSettings) -> str:
    """A rendered page of the document, with no "try it out" that could publish to the broker."""
    return get_asyncapi_html(specification(settings), try_it_out_path=None)


def default_settings() -> KafkaSettings:
    """Defaults only, whatever the environment says: the committed document must not vary by machine."""
    return KafkaSettings.model_construct()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the AsyncAPI document of the command topics.")
    parser.add_argument("--output", type=Path, default=DOCUMENT_PATH, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output.write_text(document_yaml(default_settings()))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
