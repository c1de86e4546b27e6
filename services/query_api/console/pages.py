"""The console's pages: server-rendered (Jinja2), plain forms, and one small script that refreshes
the regions waiting for an outcome. Every action is a command published like POST /commands'
(validated by the same models, the signed-in key's name as its actor), and the page that follows
shows its outcome when the consumer has applied it.

Each page needs the scope its API counterpart needs: segments and users `read`, history
`reports`, commands and imports' progress `status`, every change `write`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParameter
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from services.query_api import readmodel
from services.query_api.console.imports import ImportJob, ImportTokens
from services.query_api.console.queries import import_progress, record_trace_id, segments, user_history
from services.query_api.console.session import COOKIE, COOKIE_PATH, Sessions, Visitor
from services.query_api.dependencies import Resources
from services.query_api.reports import MonthDropped
from shared.assignments import ParsedFile, explain, parse_assignments
from shared.client import KafkaUnavailable
from shared.commands import MAX_USER_ID
from shared.durations import parse_duration
from shared.outcomes import format_timestamp

log = structlog.get_logger("query_api")
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
templates.env.filters["timestamp"] = lambda moment: format_timestamp(moment) if moment else ""
templates.env.filters["thousands"] = lambda number: f"{number:,}"
# 30 rather than 30.00; 12.5 stays 12.5
templates.env.filters["percent"] = lambda value: f"{Decimal(str(value)).normalize():f}"

# The console's own assets only; no inline script, nothing from elsewhere, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
HISTORY_ROWS_SHOWN = 500
PROBLEMS_SHOWN = 200  # an import's invalid rows (or rows not applied) listed with their errors; the rest counted
MONTH = re.compile(r"(\d{4})-(\d{2})")
POLL_DONE = "X-Poll-Done"  # a polled region's answer is final: stop polling


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


class SignInNeeded(Exception):
    def __init__(self, then: str) -> None:
        super().__init__(then)
        self.then = then


def console_of(request: Request) -> Console:
    return request.app.state.console


def resources_of(request: Request) -> Resources:
    return request.app.state.resources


async def visitor_of(request: Request) -> Visitor:
    return await console_of(request).sessions.visitor(request.cookies.get(COOKIE))


VisitorDep = Annotated[Visitor, Depends(visitor_of)]


def _requiring(scope: str):
    async def dependency(request: Request, visitor: VisitorDep) -> Visitor:
        if not visitor.signed_in:
            then = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInNeeded(then)
        if not visitor.can(scope):
            raise ConsoleError(403, "Not allowed", f"The key {visitor.name!r} does not have the scope {scope!r} "
                                                   "this page needs. Ask for a key that has it.")
        return visitor

    return Depends(dependency)


Reader = Annotated[Visitor, _requiring("read")]
Writer = Annotated[Visitor, _requiring("write")]
StatusReader = Annotated[Visitor, _requiring("status")]


async def checked_form(request: Request, visitor: Visitor) -> FormData:
    """The form of a state-changing request, refused unless it carries the session's CSRF token."""
    form = await request.form()
    token = form.get("csrf_token")
    if not console_of(request).sessions.csrf_valid(visitor, token if isinstance(token, str) else None):
        raise ConsoleError(403, "Form expired", "This form's security token does not match your session (it was "
                                                "sent from another site, or your session changed). Reload the page "
                                                "and send the form again.")
    return form


def _with_session(request: Request, response: Response, visitor: Visitor) -> Response:
    if visitor.cookie:
        console = console_of(request)
        response.set_cookie(COOKIE, visitor.cookie, max_age=console.sessions.max_age_seconds, path=COOKIE_PATH,
                            httponly=True, samesite="strict",
                            secure=console.secure_cookies or request.url.scheme == "https")
    response.headers.update(SECURITY_HEADERS)
    return response


def render(request: Request, visitor: Visitor, template: str, status: int = 200, headers: dict | None = None,
           **context: Any) -> Response:
    resources = resources_of(request)
    response = templates.TemplateResponse(request, template, {
        "visitor": visitor, "access_control": resources.keys.enabled, "page": template.removesuffix(".html"),
        **context}, status_code=status, headers=headers)
    return _with_session(request, response, visitor)


def see_other(request: Request, visitor: Visitor, url: str) -> Response:
    return _with_session(request, RedirectResponse(url, status_code=303), visitor)


def field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def publish(request: Request, visitor: Visitor, command: dict[str, Any]) -> str:
    """Publish `command` as the visitor; its command id."""
    command["actor"] = visitor.name
    try:
        sent = await resources_of(request).publisher.publish(command, traceparent=request.headers.get("traceparent"))
    except ValidationError as error:
        raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                           [explain(error)]) from error
    except KafkaUnavailable as error:
        raise ConsoleError(503, "Kafka is unavailable", f"Nothing was published: {error}") from error
    log.info("command published", command_id=sent.command_id, type=command["type"], actor=visitor.name,
             topic=sent.topic, partition=sent.partition, offset=sent.offset, via="console")
    return sent.command_id


def command_page(command_id: str) -> str:
    return f"/ui/commands/{quote(command_id, safe='')}"


def published(request: Request, visitor: Visitor, command_id: str) -> Response:
    """After an action: its command's page, where the outcome appears; a key without the `status`
    scope cannot see outcomes, so it is told the command was published and no more."""
    if visitor.can("status"):
        return see_other(request, visitor, command_page(command_id))
    return render(request, visitor, "published.html", status=202, command_id=command_id)


# --- signing in -------------------------------------------------------------------------------

@router.get("")
@router.get("/")
async def home(request: Request, visitor: VisitorDep) -> Response:
    return see_other(request, visitor, "/ui/segments")


def _safe_next(then: str) -> str:
    """Only a page of the console: never an address elsewhere (an open redirect)."""
    return then if then.startswith("/ui/") and not then.startswith("/ui//") and "\\" not in then else "/ui/segments"


@router.get("/signin")
async def signin_page(request: Request, visitor: VisitorDep, next: str = "/ui/segments") -> Response:
    if not visitor.access_control:
        return see_other(request, visitor, _safe_next(next))
    return render(request, visitor, "signin.html", then=_safe_next(next))


@router.post("/signin")
async def signin(request: Request, visitor: VisitorDep) -> Response:
    form = await checked_form(request, visitor)
    then = _safe_next(field(form, "next"))
    signed_in = console_of(request).sessions.signed_in(field(form, "api_key"))
    if signed_in is None:
        log.warning("console sign-in refused: unknown or revoked key")
        return render(request, visitor, "signin.html", status=401, then=then,
                      problem="This API key is not valid: it is unknown or has been revoked.")
    log.info("console sign-in", key=signed_in.name)
    return see_other(request, signed_in, then)


@router.post("/signout")
async def signout(request: Request, visitor: VisitorDep) -> Response:
    await checked_form(request, visitor)
    return see_other(request, await console_of(request).sessions.signed_out(visitor), "/ui/signin")


# --- segments ---------------------------------------------------------------------------------

SlugPath = Annotated[str, PathParameter(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]


@router.get("/segments")
async def segments_page(request: Request, visitor: Reader) -> Response:
    rows, known = await resources_of(request).reads.read(segments, replica_first=True)
    return render(request, visitor, "segments.html", segments=rows, known_users=known)


def _percent(text: str) -> int | float:
    """A form's percent as the JSON number the command carries."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                           [f"percent: {text!r} is not a number"])
    if not 0 <= value <= 100:  # before any conversion: 1e999999999 is a number too
        raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                           [f"percent: {text} is not from 0 to 100"])
    return int(value) if value == value.to_integral_value() else float(value)


@router.post("/segments")
async def create_segment(request: Request, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    command: dict[str, Any] = {"type": "create_segment", "slug": field(form, "slug"),
                               "percent": _percent(field(form, "percent") or "0")}
    if field(form, "description"):
        command["description"] = field(form, "description")
    return published(request, visitor, await publish(request, visitor, command))


async def _live_segment(request: Request, slug: str) -> dict[str, Any]:
    segment = await resources_of(request).reads.read(lambda pool: readmodel.live_segment(pool, slug),
                                                       replica_first=False)
    if segment is None:
        raise ConsoleError(404, "No such segment", f"There is no live segment {slug}.")
    return segment


@router.get("/segments/{slug}")
async def segment_page(request: Request, slug: SlugPath, visitor: Reader) -> Response:
    return render(request, visitor, "segment.html", segment=await _live_segment(request, slug))


@router.post("/segments/{slug}")
async def update_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    command: dict[str, Any] = {"type": "update_segment", "slug": slug, "description": field(form, "description")}
    if field(form, "percent"):
        command["percent"] = _percent(field(form, "percent"))
    return published(request, visitor, await publish(request, visitor, command))


@router.get("/segments/{slug}/delete")
async def delete_segment_page(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    return render(request, visitor, "delete.html", segment=await _live_segment(request, slug))


@router.post("/segments/{slug}/delete")
async def delete_segment(request: Request, slug: SlugPath, visitor: Writer) -> Response:
    await checked_form(request, visitor)
    command = {"type": "delete_segment", "slug": slug}
    return published(request, visitor, await publish(request, visitor, command))


# --- users ------------------------------------------------------------------------------------

UserIdPath = Annotated[int, PathParameter(ge=1, le=MAX_USER_ID)]


@router.get("/users")
async def find_user(request: Request, visitor: Reader, user_id: str = "") -> Response:
    if not user_id:
        return render(request, visitor, "find_user.html")
    if not re.fullmatch(r"[0-9]{1,19}", user_id.strip()) or not 1 <= int(user_id) <= MAX_USER_ID:
        return render(request, visitor, "find_user.html", status=422, user_id=user_id,
                      problem=f"{user_id!r} is not a user id: a whole number from 1 to {MAX_USER_ID}.")
    return see_other(request, visitor, f"/ui/users/{int(user_id)}")


def _month(text: str) -> tuple[int, int]:
    found = MONTH.fullmatch(text)
    if not found or not 1 <= int(found[2]) <= 12 or int(found[1]) < 1:
        raise ConsoleError(422, "Not a month", f"{text!r} is not a month: write it as YYYY-MM, e.g. 2026-11.")
    return int(found[1]), int(found[2])


@router.get("/users/{user_id}")
async def user_page(request: Request, user_id: UserIdPath, visitor: Reader, month: str = "") -> Response:
    resources = resources_of(request)
    now = datetime.now(UTC)
    year, number = _month(month) if month else (now.year, now.month)
    found = await resources.reads.memberships(user_id, None)
    member_of = await readmodel.user_segments_list(found, resources.rollout, user_id)
    registered = await resources.reads.read(lambda pool: readmodel.user(pool, user_id), replica_first=True)
    live = await resources.reads.read(readmodel.live_segments, replica_first=True)
    history, more, dropped, link = [], False, None, None
    if visitor.can("reports"):
        try:
            history, more = await resources.reads.read(
                lambda pool: user_history(pool, user_id, year, number, HISTORY_ROWS_SHOWN), replica_first=True)
            link = resources.report_link(request, year, number, user_id)
        except MonthDropped as error:
            dropped = str(error)
    return render(request, visitor, "user.html", user_id=user_id, segments=member_of, live=live,
                  registered_at=registered["registered_at"] if registered else None,
                  month=f"{year:04d}-{number:02d}", history=history, more=more, dropped=dropped, report_link=link,
                  rows_shown=HISTORY_ROWS_SHOWN)


def _slugs(text: str) -> list[str]:
    return [slug for slug in re.split(r"[\s,]+", text) if slug]


@router.post("/users/{user_id}/segments")
async def change_user_segments(request: Request, user_id: UserIdPath, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    add = _slugs(field(form, "add"))
    remove = [value for value in form.getlist("remove") if isinstance(value, str) and value]
    if not add and not remove:
        raise ConsoleError(422, "Nothing to change", "Name segments to add, or tick segments to remove.")
    command: dict[str, Any] = {"type": "update_user_segments", "user_id": user_id, "add": add, "remove": remove}
    ttl = field(form, "ttl")
    if ttl:
        if not add:
            raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                               ["ttl: a time to live only applies to segments being added"])
        try:
            command["ttl_seconds"] = parse_duration(ttl)
        except ValueError as error:
            raise ConsoleError(422, "The command is not valid", "Nothing was published.",
                               [f"ttl: {error}"]) from None
    return published(request, visitor, await publish(request, visitor, command))


# --- commands ---------------------------------------------------------------------------------

CommandIdPath = Annotated[str, PathParameter(min_length=1, max_length=200)]


@router.get("/commands")
async def find_command(request: Request, visitor: StatusReader, command_id: str = "") -> Response:
    if command_id.strip():
        return see_other(request, visitor, command_page(command_id.strip()))
    return render(request, visitor, "find_command.html")


async def _outcome_context(request: Request, command_id: str) -> dict[str, Any]:
    resources = resources_of(request)
    found = await readmodel.command_outcome(resources.pool, command_id)
    if found is None:
        return {"command_id": command_id, "outcome": None}
    row, token = found
    outcome = row.contract(token)
    trace_url = None
    template = resources.console.ui_trace_url
    if template:
        trace_id = await record_trace_id(resources.kafka, row.source_topic, row.source_partition,
                                         row.source_offset)
        trace_url = template.replace("{trace_id}", trace_id) if trace_id else None
    result = orjson.dumps(outcome["result"], option=orjson.OPT_INDENT_2).decode() if outcome["result"] else None
    return {"command_id": command_id, "outcome": outcome, "result": result, "trace_url": trace_url,
            "tracing": bool(template)}


@router.get("/commands/{command_id}")
async def command_view(request: Request, command_id: CommandIdPath, visitor: StatusReader) -> Response:
    context = await _outcome_context(request, command_id)
    return render(request, visitor, "command.html", poll=f"{command_page(command_id)}/outcome", **context)


@router.get("/commands/{command_id}/outcome")
async def command_outcome_fragment(request: Request, command_id: CommandIdPath, visitor: StatusReader) -> Response:
    context = await _outcome_context(request, command_id)
    headers = {POLL_DONE: "1"} if context["outcome"] else None
    return render(request, visitor, "_outcome.html", headers=headers, **context)


# --- bulk import ------------------------------------------------------------------------------

@router.get("/import")
async def import_page(request: Request, visitor: Writer) -> Response:
    return render(request, visitor, "import.html")


async def _parsed(visitor: Visitor, data: bytes) -> ParsedFile:
    """The file checked in a worker thread, so a large file never holds up the event loop (and the
    hot read with it); at most PROBLEMS_SHOWN invalid rows are listed, all of them counted."""
    try:
        return await asyncio.to_thread(parse_assignments, data, visitor.name, PROBLEMS_SHOWN)
    except ValueError as error:
        raise ConsoleError(422, "This file cannot be imported", str(error)) from None


def _publish_form_bytes(content: str) -> int:
    """The size of the publish form that carries `content` (URL-safe base64 needs no escaping)."""
    return len("csrf_token=&content=") + 64 + len(content)


@router.post("/import")
async def check_import(request: Request, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    upload = form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise ConsoleError(422, "No file", "Choose a CSV file to import.")
    data = await upload.read()
    content = base64.urlsafe_b64encode(data).decode()
    limit = resources_of(request).api.max_request_body_bytes
    if _publish_form_bytes(content) > limit:  # refused now, not after the check says it is fine
        raise ConsoleError(413, "This file is too large to import here",
                           f"The console publishes files of up to {limit * 3 // 4 - 100:,} bytes "
                           f"(MAX_REQUEST_BODY_BYTES); this one has {len(data):,}. Split it, or import it with "
                           "`segmentctl import`, which has no such limit.")
    parsed = await _parsed(visitor, data)
    return render(request, visitor, "import_check.html", parsed=parsed, filename=upload.filename, content=content,
                  listed=PROBLEMS_SHOWN)


@router.post("/import/publish")
async def publish_import(request: Request, visitor: Writer) -> Response:
    form = await checked_form(request, visitor)
    try:
        data = base64.b64decode(field(form, "content"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ConsoleError(422, "This file cannot be imported", "The file's content was altered on its way; "
                                                                "upload it again.") from None
    parsed = await _parsed(visitor, data)
    if not parsed.rows:
        raise ConsoleError(422, "Nothing to import", "The file has no valid row.")
    publisher = resources_of(request).publisher
    try:  # pipelined: each submit only enqueues; order per key is kept
        deliveries = [await publisher.submit(row.command) for row in parsed.rows]
        await asyncio.gather(*deliveries)
    except KafkaUnavailable as error:
        raise ConsoleError(503, "Kafka is unavailable", f"The import stopped: {error}. Importing the same file "
                                                        "again is safe: rows already applied are not applied "
                                                        "twice.") from error
    log.info("import published", rows=len(parsed.rows), invalid=parsed.invalid, digest=parsed.digest,
             actor=visitor.name, via="console")
    job = ImportJob(parsed.digest, [row.line for row in parsed.rows], parsed.invalid)
    if not visitor.can("status"):
        return render(request, visitor, "published.html", status=202, rows=len(parsed.rows),
                      invalid=parsed.invalid)
    return see_other(request, visitor, f"/ui/import/{console_of(request).imports.dumps(job)}")


def _job(request: Request, token: str) -> ImportJob:
    job = console_of(request).imports.loads(token)
    if job is None:
        raise ConsoleError(404, "No such import", "This import's address is not valid, or it has expired "
                                                  "(import pages last as long as outcomes are kept).")
    return job


async def _progress_context(request: Request, token: str) -> dict[str, Any]:
    job = _job(request, token)
    progress = await import_progress(resources_of(request).pool, job, PROBLEMS_SHOWN)
    return {"job": job, "progress": progress, "token": token, "poll": f"/ui/import/{token}/progress"}


@router.get("/import/{token}")
async def import_job_page(request: Request, token: str, visitor: StatusReader) -> Response:
    return render(request, visitor, "import_job.html", **await _progress_context(request, token))


@router.get("/import/{token}/progress")
async def import_progress_fragment(request: Request, token: str, visitor: StatusReader) -> Response:
    context = await _progress_context(request, token)
    headers = {POLL_DONE: "1"} if context["progress"].done else None
    return render(request, visitor, "_import_progress.html", headers=headers, **context)
