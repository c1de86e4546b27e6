"""What the console's routes share: its state, its errors, who is looking and what they may do,
checked forms, and publishing a command as the visitor."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from services.query_api.console.import_tokens import ImportTokens
from services.query_api.console.rendering import render, see_other
from services.query_api.console.session import Sessions, Visitor
from services.query_api.dependencies import Resources
from shared.client import KafkaUnavailable
from shared.validation import rule

log = structlog.get_logger("query_api")


@dataclass
class Console:
    """The console's state, made once by create_app."""

    sessions: Sessions
    imports: ImportTokens
    secure_cookies: bool  # API_PUBLIC_URL is https: cookies only over HTTPS


class ConsoleError(Exception):
    """A page that explains what went wrong, with its HTTP status."""

    def __init__(self, status: int, title: str, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.title, self.message, self.details = status, title, message, details or []


class FormProblem(ConsoleError):
    """A form's values refused: the page shows the form again with what was typed, and each
    problem next to its field (`fields`: field name -> the problem in words)."""

    def __init__(self, fields: dict[str, str], message: str = "Nothing was published.") -> None:
        super().__init__(422, "The form has a problem", message,
                         [f"{name}: {problem}" for name, problem in fields.items()])
        self.fields = fields


def form_fields(error: ValidationError) -> dict[str, str]:
    """A command's validation errors by the form field they belong to (`add[0]` belongs to `add`)."""
    fields: dict[str, str] = {}
    for item in error.errors(include_url=False):
        location = [part for part in item["loc"][1:] if isinstance(part, str)]  # after the command's type
        name = location[0] if location else "form"
        fields.setdefault(name, rule(item))
    return fields


def console_of(request: Request) -> Console:
    return request.app.state.console


def resources_of(request: Request) -> Resources:
    return request.app.state.resources


async def checked_form(request: Request, visitor: Visitor) -> FormData:
    """The form of a state-changing request, refused unless it carries the session's CSRF token."""
    form = await request.form()
    token = form.get("csrf_token")
    if not console_of(request).sessions.csrf_valid(visitor, token if isinstance(token, str) else None):
        raise ConsoleError(403, "Form expired", "This form's security token does not match your session (it was "
                                                "sent from another site, or your session changed). Reload the page "
                                                "and send the form again.")
    return form


def field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def publish(request: Request, visitor: Visitor, command: dict[str, Any]) -> str:
    """Publish `command` as the visitor; its command id."""
    command["actor"] = visitor.name
    try:
        sent = await resources_of(request).publisher.publish(command, traceparent=request.headers.get("traceparent"))
    except ValidationError as error:
        raise FormProblem(form_fields(error)) from error
    except KafkaUnavailable as error:
        raise ConsoleError(503, "Kafka is unavailable", f"Nothing was published: {error}") from error
    log.info("command published", command_id=sent.command_id, type=command["type"], actor=visitor.name,
             topic=sent.topic, partition=sent.partition, offset=sent.offset, via="console")
    return sent.command_id


def command_page(command_id: str) -> str:
    return f"/ui/commands/{quote(command_id, safe='')}"


def published(request: Request, visitor: Visitor, command_id: str, *, stay_on: str | None = None,
              user: int | None = None, segment: str | None = None) -> Response:
    """After an action: the page it was made on (`stay_on`), which shows the outcome in place, or
    the command's page, which links back to the user or segment it was about. A key without the
    `status` scope cannot see outcomes, so it is told the command was published and no more."""
    if not visitor.can("status"):
        return render(request, visitor, "published.html", status=202, command_id=command_id)
    if stay_on is not None:
        return see_other(request, visitor, f"{stay_on}?{urlencode({'command': command_id})}")
    about = {"user": user} if user is not None else {"segment": segment} if segment is not None else {}
    return see_other(request, visitor, f"{command_page(command_id)}?{urlencode({**about, 'sent': int(time.time())})}")
