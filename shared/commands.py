"""The command contract as pydantic models: one discriminated union on `type`.

The command consumer and the HTTP gateway validate with these same models, so a command
the gateway accepts is one the consumer can apply.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

MAX_USER_ID = 2**63 - 1
MAX_TTL_SECONDS = 315_360_000
MAX_SLUGS_PER_LIST = 1000
MAX_SLUG_LENGTH = 128
# A slug, as every command, path and form takes it; a new one also begins with a letter or a digit.
SLUG_PATTERN = r"^[A-Za-z0-9_.\-]+$"
NEW_SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

Slug = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_SLUG_LENGTH, pattern=SLUG_PATTERN),
    Field(description="1-128 chars of A-Z a-z 0-9 _ - . (case-sensitive)", examples=["AVITO_VOICE_MESSAGES"]),
]


def _number_only(value: Any) -> Any:
    """JSON numbers only: the contract's percent is a number, not a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValueError("must be a JSON number")
    return Decimal(repr(value)) if isinstance(value, float) else value


Percent = Annotated[
    Decimal,
    BeforeValidator(_number_only),
    Field(ge=0, le=100, decimal_places=2, description="0-100 with at most 2 decimals", examples=[10]),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01,
                    "description": "0-100 with at most 2 decimals", "examples": [10]}),
]


def _rfc3339_text(value: Any) -> Any:
    """RFC 3339 text only: pydantic would also take a number as seconds since the epoch."""
    if not isinstance(value, (str, datetime)):
        raise ValueError("must be an RFC 3339 timestamp string")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


def _json_integer(value: Any) -> Any:
    """A JSON integer: 1000, or 1000.0 (the same number to JSON Schema), never "1000" or true. A
    float above 2**53 may already be another integer after parsing, so it is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a JSON integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        if abs(value) > 2**53:
            raise ValueError("is too large to be exact as a JSON float; send it without a decimal point")
        return int(value)
    return value


UserId = Annotated[int, Field(ge=1, le=MAX_USER_ID, examples=[1000]), BeforeValidator(_json_integer)]


# Text that reaches operators' terminals and log lines (ids, actors, descriptions) may not move the
# cursor, start an escape sequence, break a line or reorder what is shown: C0 and C1 controls, DEL,
# Unicode line separators and bidirectional overrides.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A description may span lines and hold tabs; nothing else that steers a terminal.
DESCRIPTION_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def plain_text(value: str) -> bool:
    """Whether `value` is free of the characters CONTROL_CHARACTERS names."""
    return CONTROL_CHARACTERS.search(value) is None


def _refuse(pattern: re.Pattern[str]):
    """A check that names the character found, and the same rule as a JSON Schema pattern (for the
    OpenAPI and AsyncAPI documents, and the clients and fuzzers that read them)."""

    def check(value: str) -> str:
        found = pattern.search(value)
        if found:
            raise ValueError(f"must not contain control characters (found U+{ord(found[0]):04X} at position "
                             f"{found.start()}): line breaks and escape sequences would reach terminals and logs")
        return value

    escaped = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028-\u2069]", lambda found: f"\\u{ord(found[0]):04x}",
                     pattern.pattern)
    return AfterValidator(check), Field(json_schema_extra={"pattern": f"^[^{escaped[1:-1]}]*$"})


CommandId = Annotated[str, StringConstraints(min_length=1, max_length=64), *_refuse(CONTROL_CHARACTERS)]
Actor = Annotated[str, StringConstraints(max_length=128), *_refuse(CONTROL_CHARACTERS)]
Description = Annotated[str, StringConstraints(max_length=1000), *_refuse(DESCRIPTION_CONTROL_CHARACTERS)]


class CommandEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    command_id: CommandId | None = None
    issued_at: Timestamp | None = None
    actor: Actor | None = None


def _new_slug(slug: str) -> str:
    """A new slug begins with a letter or a digit: a first "-" makes a report cell a spreadsheet
    formula (CSV injection), and "." and ".." are resolved away as URL path segments."""
    if slug[:1] in ("-", "_", "."):
        raise ValueError("a new segment's slug must begin with a letter or a digit (A-Z, a-z, 0-9); "
                         "slugs beginning with - _ . are refused because spreadsheets read a cell like -A1 as "
                         "a formula and HTTP clients resolve . and .. as path segments")
    return slug


NewSlug = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_SLUG_LENGTH, pattern=NEW_SLUG_PATTERN),
    BeforeValidator(lambda value: _new_slug(value) if isinstance(value, str) and value else value),
    Field(description="1-128 chars of A-Z a-z 0-9 _ - . (case-sensitive), beginning with a letter or a digit",
          examples=["AVITO_VOICE_MESSAGES"]),
]


class CreateSegment(CommandEnvelope):
    type: Literal["create_segment"]
    slug: NewSlug
    percent: Percent = Decimal(0)
    description: Description | None = None


def _schema_extra(**extra: Any):
    """Adds `extra` to a model's schema and drops `"default": null` from fields that are optional but
    not nullable (a fuzzer would take that default for a valid value)."""

    def update(schema: dict[str, Any]) -> None:
        for field in schema.get("properties", {}).values():
            if "default" in field and field["default"] is None and "anyOf" not in field:
                del field["default"]
        schema.update(extra)

    return update


class UpdateSegment(CommandEnvelope):
    model_config = ConfigDict(json_schema_extra=_schema_extra(
        anyOf=[{"required": ["percent"]}, {"required": ["description"]}]))

    type: Literal["update_segment"]
    slug: Slug
    # Optional but not nullable: an explicit null would pass the schema's "percent and/or
    # description" yet change nothing.
    percent: Percent = None
    description: Description = None

    @model_validator(mode="after")
    def _something_to_change(self) -> UpdateSegment:
        if self.percent is None and self.description is None:
            raise ValueError("update_segment needs percent and/or description")
        return self


class DeleteSegment(CommandEnvelope):
    type: Literal["delete_segment"]
    slug: Slug


class CreateUser(CommandEnvelope):
    type: Literal["create_user"]
    user_id: UserId


class UpdateUserSegments(CommandEnvelope):
    model_config = ConfigDict(json_schema_extra=_schema_extra(**{
        "not": {"required": ["ttl_seconds", "expires_at"]},
        "description": "ttl_seconds or expires_at (which must be in the future), not both"}))

    type: Literal["update_user_segments"]
    user_id: UserId
    add: Annotated[list[Slug], Field(max_length=MAX_SLUGS_PER_LIST, default_factory=list)]
    remove: Annotated[list[Slug], Field(max_length=MAX_SLUGS_PER_LIST, default_factory=list)]
    # Optional but not nullable, as the schema's "not both" counts keys: {"ttl_seconds": null,
    # "expires_at": …} breaks it, so the model refuses it too.
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS), BeforeValidator(_json_integer)] = None
    expires_at: Timestamp = None

    @model_validator(mode="after")
    def _one_expiry(self) -> UpdateUserSegments:
        if self.ttl_seconds is not None and self.expires_at is not None:
            raise ValueError("give ttl_seconds or expires_at, not both")
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            raise ValueError("expires_at must be in the future")
        return self

    def expiry_from(self, now: datetime) -> datetime | None:
        if self.ttl_seconds is not None:
            return now + timedelta(seconds=self.ttl_seconds)
        return self.expires_at.astimezone(UTC) if self.expires_at else None


Command = Annotated[
    CreateSegment | UpdateSegment | DeleteSegment | CreateUser | UpdateUserSegments,
    Field(discriminator="type"),
]
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)


def command_json_schema(ref_prefix: str = "#/components/schemas/") -> tuple[dict, dict]:
    """The union's JSON Schema and its definitions, for an OpenAPI or AsyncAPI document."""
    schema = command_adapter.json_schema(ref_template=ref_prefix + "{model}")
    return schema, schema.pop("$defs", {})

SEGMENT_COMMAND_TYPES = frozenset({"create_segment", "update_segment", "delete_segment"})
USER_COMMAND_TYPES = frozenset({"create_user", "update_user_segments"})
COMMAND_TYPES = SEGMENT_COMMAND_TYPES | USER_COMMAND_TYPES


def partition_key(command: Command) -> bytes:
    """The record key that keeps per-segment and per-user order (README: "The contract, in short", Topics)."""
    if isinstance(command, (CreateSegment, UpdateSegment, DeleteSegment)):
        return command.slug.encode()
    return str(command.user_id).encode()
