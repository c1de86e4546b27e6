"""The committed AsyncAPI document is the one the FastStream app generates, and it tells the truth."""

from __future__ import annotations

import yaml

from shared import asyncapi
from shared.commands import command_adapter


def generated() -> dict:
    return yaml.safe_load(asyncapi.document_yaml(asyncapi.default_settings()))


def test_committed_document_is_not_stale():
    committed = yaml.safe_load(asyncapi.DOCUMENT_PATH.read_text())
    assert committed == generated(), "docs/asyncapi.yaml is stale: run `make asyncapi` and commit the result"


def test_document_names_every_topic_and_command_with_the_contract_models():
    document = generated()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {"segments.commands", "assignments.commands", "segments.command-results",
                         "segments.commands.dlq", "segments.membership-changes"}
    actions = {name.split(":")[0]: operation["action"] for name, operation in document["operations"].items()}
    assert actions == {"segments.commands": "receive", "assignments.commands": "receive",
                       "segments.command-results": "send", "segments.commands.dlq": "send",
                       "segments.membership-changes": "send"}
    schemas = document["components"]["schemas"]
    union = {ref["$ref"].rsplit("/", 1)[1] for ref in command_adapter.json_schema()["oneOf"]}
    assert union <= set(schemas)
    assert schemas["UpdateUserSegments"]["properties"]["add"] == command_adapter.json_schema()["$defs"][
        "UpdateUserSegments"]["properties"]["add"]
    assert set(schemas["Outcome"]["required"]) >= {"command_id", "status", "processed_at", "source"}
    # The stream's two kinds of event, with the contract's fields.
    assert set(schemas["MembershipChange"]["properties"]) == {
        "event_id", "kind", "user_id", "segment", "operation", "source", "reason", "executed_at", "expires_at",
        "command_id"}
    assert set(schemas["RolloutChange"]["properties"]) == {
        "event_id", "kind", "segment", "from_percent", "to_percent", "reason", "buckets_entered", "buckets_left",
        "executed_at", "command_id"}


def test_configured_topic_names_flow_into_the_document():
    settings = asyncapi.default_settings().model_copy(update={"results_topic": "team.results"})
    document = yaml.safe_load(asyncapi.document_yaml(settings))
    assert "team.results" in {channel["address"] for channel in document["channels"].values()}


def test_rendered_page_has_no_try_it_out():
    page = asyncapi.document_html(asyncapi.default_settings())
    assert "AsyncApiStandalone" in page and "segments.command-results" in page
    assert "try-it" not in page and "asyncapi/try" not in page
