"""Bulk import: a CSV checked row by row, published, and followed to its outcomes."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from services.query_api.console.access import StatusReader, Writer
from services.query_api.console.deps import ConsoleError, checked_form, console_of, field, resources_of
from services.query_api.console.import_tokens import ImportJob
from services.query_api.console.queries import import_progress
from services.query_api.console.rendering import POLL_DONE, render, see_other
from services.query_api.console.session import Visitor
from shared.assignments import ParsedFile, parse_assignments
from shared.client import KafkaUnavailable

log = structlog.get_logger("query_api")
router = APIRouter(prefix="/ui", include_in_schema=False)


PROBLEMS_SHOWN = 200  # an import's invalid rows (or rows not applied) listed with their errors; the rest counted

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
