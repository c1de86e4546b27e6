"""The command contract as pydantic models: one discriminated union on `type`.

The command consumer and the HTTP gateway validate with these same models, so a command
the gateway accepts is one the consumer can apply.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
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

Slug = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$"),
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
UserId = Annotated[int, Field(strict=True, ge=1, le=MAX_USER_ID, examples=[1000])]


class CommandEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    command_id: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    issued_at: Timestamp | None = None
    actor: Annotated[str, StringConstraints(max_length=128)] | None = None


class CreateSegment(CommandEnvelope):
    type: Literal["create_segment"]
    slug: Slug
    percent: Percent = Decimal(0)
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None


class UpdateSegment(CommandEnvelope):
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["percent"]}, {"required": ["description"]}]})

    type: Literal["update_segment"]
    slug: Slug
    percent: Percent | None = None
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None

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
    model_config = ConfigDict(json_schema_extra={
        "not": {"required": ["ttl_seconds", "expires_at"]},
        "description": "ttl_seconds or expires_at (which must be in the future), not both"})

    type: Literal["update_user_segments"]
    user_id: UserId
    add: Annotated[list[Slug], Field(max_length=MAX_SLUGS_PER_LIST, default_factory=list)]
    remove: Annotated[list[Slug], Field(max_length=MAX_SLUGS_PER_LIST, default_factory=list)]
    ttl_seconds: Annotated[int, Field(strict=True, ge=1, le=MAX_TTL_SECONDS)] | None = None
    expires_at: Timestamp | None = None

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
    """The record key that keeps per-segment and per-user order (CONTRACT: topics)."""
    if isinstance(command, (CreateSegment, UpdateSegment, DeleteSegment)):
        return command.slug.encode()
    return str(command.user_id).encode()
