"""OpenTelemetry across the services, recorded by the SDK's in-memory exporter: one trace from the
HTTP request through the produce, the consumer's command span and its database work to the
outcome record; foreign trace context continued; a rejected command's span says why; log lines
inside spans carry the ids. (Tracing off, configured by the environment: tests/e2e/test_tracing.py.)"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from services.query_api.app import create_app
from services.query_api.readmodel import USER_SEGMENTS_SQL, create_lookup_pool
from shared import tracing
from shared.db import create_pool
from tests.support import Publisher, header, read_topic, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
FOREIGN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FOREIGN_PARENT = "00f067aa0ba902b7"



@contextlib.asynccontextmanager
async def api(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            yield client


def by_name(finished, name: str):
    return [span for span in finished if span.name == name]


async def test_a_command_through_post_commands_is_one_trace_to_its_outcome(settings, pool, spans):
    async with api(settings) as client, running_consumer(settings, pool):
        assert (await client.post("/commands", json={"type": "create_segment", "slug": "T",
                                                      "command_id": "traced"})).status_code == 202
        await wait_for_outcomes(pool, ["traced"])
    finished = spans.get_finished_spans()
    request = next(span for span in finished if span.name == "POST /commands" and span.kind is SpanKind.SERVER)
    trace_id = request.context.trace_id
    in_trace = [span for span in finished if span.context.trace_id == trace_id]
    names = {span.name for span in in_trace}
    assert f"{settings.segments_commands_topic} send" in names  # the produce, by aiokafka's instrumentation
    command = next(span for span in in_trace if span.name == "apply create_segment")
    assert command.attributes["segmentation.command.status"] == "applied"
    assert command.attributes["messaging.message.id"] == "traced"
    batch = next(span for span in in_trace if span.name == f"process {settings.segments_commands_topic}")
    database = [span for span in in_trace if span.parent and span.parent.span_id == batch.context.span_id
                and span.kind is SpanKind.CLIENT]
    assert any("segments" in (span.attributes.get("db.statement") or span.attributes.get("db.query.text") or "")
               for span in database)  # its database work, by asyncpg's instrumentation
    results = await read_topic(settings, settings.results_topic, 1)
    _, outcome_trace, outcome_parent, _ = header(results[0], "traceparent").split("-")
    assert outcome_trace == format(trace_id, "032x")  # the outcome carries the trace on,
    assert outcome_parent == format(command.context.span_id, "016x")  # from the command's span


async def test_a_foreign_traceparent_is_continued_and_a_rejection_says_why(settings, pool, spans):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "delete_segment", "slug": "NOPE", "command_id": "foreign"},
                              headers=[("traceparent", f"00-{FOREIGN_TRACE}-{FOREIGN_PARENT}-01".encode())])
        await wait_for_outcomes(pool, ["foreign"])
    command = by_name(spans.get_finished_spans(), "apply delete_segment")[0]
    assert format(command.context.trace_id, "032x") == FOREIGN_TRACE
    assert format(command.parent.span_id, "016x") == FOREIGN_PARENT
    assert command.status.status_code is StatusCode.ERROR
    assert "segment_not_found" in command.status.description and "NOPE" in command.status.description
    assert command.attributes["error.type"] == "segment_not_found"


async def test_the_hot_read_is_a_server_span_of_its_callers_trace_and_its_shared_query_of_none(settings, pool, spans):
    await pool.execute("INSERT INTO users VALUES (1, now())")
    async with api(settings) as client:
        sampled = {"traceparent": f"00-{FOREIGN_TRACE}-{FOREIGN_PARENT}-01"}
        assert (await client.get("/users/1/segments", headers=sampled)).status_code == 200
        unsampled = {"traceparent": f"00-{'1' * 32}-{FOREIGN_PARENT}-00"}
        assert (await client.get("/users/1/segments", headers=unsampled)).status_code == 200
    [read] = by_name(spans.get_finished_spans(), "GET /users/{user_id}/segments")
    assert read.kind is SpanKind.SERVER
    assert format(read.context.trace_id, "032x") == FOREIGN_TRACE
    assert format(read.parent.span_id, "016x") == FOREIGN_PARENT
    assert read.attributes["http.response.status_code"] == 200
    assert read.attributes["url.path"] == "/users/1/segments"
    # The query answering both requests (and any others waiting with them) is in no trace.
    statements = [span.attributes.get("db.statement") or span.attributes.get("db.query.text")
                  for span in spans.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert statements  # the database is instrumented (the app's start-up queries, say),
    assert USER_SEGMENTS_SQL not in statements  # but not the shared query


async def test_the_lookup_pool_queries_past_asyncpg_instrumentation(settings, spans):
    """The hot read's lookup connections run asyncpg's own fetch: not even the instrumentation's
    wrapper runs (it would make a span here, inside a traced request, as it does for a plain pool)."""
    lookup = await create_lookup_pool(settings.database_url, 1)
    plain = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        with tracing.tracer().start_as_current_span("request"):
            assert await lookup.fetchval("SELECT 'lookup'") == "lookup"
            assert await lookup.fetch("SELECT 'lookup fetch'") == [("lookup fetch",)]
            assert await plain.fetch("SELECT 'plain'") == [("plain",)]
    finally:
        await lookup.close()
        await plain.close()
    statements = [span.attributes.get("db.statement") or span.attributes.get("db.query.text")
                  for span in spans.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert "SELECT 'plain'" in statements  # the instrumentation is on
    assert "SELECT 'lookup fetch'" not in statements  # and the lookup's fetch is past it
    assert "SELECT 'lookup'" in statements  # (only fetch: the lookup uses nothing else)


async def test_statements_prepared_as_a_connection_opens_make_no_span(settings, spans):
    """A pool's connections prepare their statements as they open (create_pool's `prepare`), past
    asyncpg's instrumentation: opening a connection is in no trace."""
    pool = await create_pool(settings.database_url, min_size=1, max_size=1, prepare=("SELECT 'prepared'",))
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements "
                                       "WHERE statement = 'SELECT ''prepared'''") == 1
            await conn.fetch("SELECT 'used'")
    finally:
        await pool.close()
    statements = [span.attributes.get("db.statement") or span.attributes.get("db.query.text")
                  for span in spans.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert "SELECT 'used'" in statements  # the instrumentation is on
    assert "SELECT 'prepared'" not in statements


async def test_log_lines_inside_a_span_carry_its_ids(spans):
    with tracing.tracer().start_as_current_span("work") as span:
        line = tracing.add_trace_ids(None, "info", {"event": "inside"})
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in tracing.add_trace_ids(None, "info", {"event": "outside"})


async def test_partition_lease_checks_make_no_spans(settings, pool, spans):
    """A leasing consumer checks its session twice a second: with tracing on, that must not be a
    trace each time in the operators' tracing backend."""
    settings = settings.model_copy(update={"consumer_partition_ownership": "lease",
                                           "consumer_lease_check_seconds": 0.05})
    async with running_consumer(settings, pool) as consumer:
        async with asyncio.timeout(30):
            while consumer.leases.checks < 10:  # noqa: ASYNC110 - counting another task's rounds
                await asyncio.sleep(0.05)
    assert len(consumer.leases.held) == 0  # released on stop
    assert [span.name for span in spans.get_finished_spans()] == []


async def test_each_request_is_one_server_span_named_by_its_route_and_probes_make_none(settings, spans):
    async with api(settings) as client:
        assert (await client.get("/segments/SOME_SLUG")).status_code == 404
        for probe in ("/healthz", "/readyz", "/metrics"):
            await client.get(probe)
    servers = [span for span in spans.get_finished_spans() if span.kind is SpanKind.SERVER]
    assert [(span.name, span.attributes.get("http.route")) for span in servers] == [
        ("GET /segments/{slug}", "/segments/{slug}")]


async def test_no_span_attribute_carries_a_report_or_import_token(settings, spans):
    """The audit's finding: `url.query` held a report link's token, which is the report itself."""
    async with api(settings) as client:
        link = (await client.get("/reports/history?year=2026&month=11")).json()["report_link"]
        token = link.partition("token=")[2]
        assert (await client.get(link)).status_code == 200
        import_token = "eyJkIjoiMDAwMCJ9.c2lnbmF0dXJl"
        await client.get(f"/ui/import/{import_token}/progress")
        await client.get("/ui/users", params={"user_id": "12345"})
    finished = spans.get_finished_spans()
    download = next(span for span in finished if span.name == "GET /reports/download")
    assert download.attributes["url.query"] == "token=REDACTED"
    console = next(span for span in finished if span.name == "GET /ui/users")
    assert console.attributes.get("url.query", "") == ""  # console pages keep no query string
    for span in finished:
        for value in span.attributes.values():
            assert token not in str(value) and import_token not in str(value), (span.name, value)
