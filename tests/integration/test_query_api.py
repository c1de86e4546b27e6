"""Every endpoint of the query API, on the real database (and broker where it publishes)."""

from __future__ import annotations

import asyncio
import re
import tracemalloc
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import orjson
import pytest
import yaml

from services.query_api.app import create_app
from services.query_api.replicas import parse_lsn
from services.query_api.reports import ReportSigner, stream_report
from shared.rollout import rollout_bucket
from tests.buckets import user_in_buckets
from tests.support import read_topic, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC)


async def add_segment(pool, slug: str, percent: float = 0, deleted: bool = False) -> int:
    return await pool.fetchval(
        "INSERT INTO segments (slug, percent, created_at, updated_at, deleted_at) VALUES ($1, $2, $3, $3, $4) "
        "RETURNING id", slug, percent, NOW, NOW if deleted else None)


async def add_membership(pool, user_id: int, segment_id: int, expires_at=None) -> None:
    await pool.execute("INSERT INTO users VALUES ($1, $2) ON CONFLICT DO NOTHING", user_id, NOW)
    await pool.execute("INSERT INTO memberships VALUES ($1, $2, $3, $4)", user_id, segment_id, NOW, expires_at)


async def test_user_segments_combines_explicit_unexpired_and_rollout_minus_exclusions(api, pool):
    voice = await add_segment(pool, "VOICE")
    gone = await add_segment(pool, "EXPIRED")
    old = await add_segment(pool, "DELETED", deleted=True)
    rollout = await add_segment(pool, "ROLLOUT", 50)
    excluded = await add_segment(pool, "EXCLUDED", 50)
    user_id = next(u for u in range(1, 100_000)
                   if rollout_bucket("ROLLOUT", u) < 5000 and rollout_bucket("EXCLUDED", u) < 5000)
    later = NOW + timedelta(days=1)
    await add_membership(pool, user_id, voice, later)
    await add_membership(pool, user_id, gone, NOW - timedelta(seconds=1))  # worker not running: still a row
    await add_membership(pool, user_id, old)
    await pool.execute("INSERT INTO rollout_exclusions VALUES ($1, $2, $3)", user_id, excluded, NOW)
    await api.app.state.resources.rollout.refresh()

    response = await api.get(f"/users/{user_id}/segments")
    assert response.status_code == 200
    assert response.json() == {"user_id": user_id, "segments": [
        {"slug": "ROLLOUT", "source": "auto", "expires_at": None},
        {"slug": "VOICE", "source": "manual",
         "expires_at": later.strftime("%Y-%m-%dT%H:%M:%S.") + f"{later.microsecond // 1000:03d}Z"},
    ]}
    assert rollout  # the rollout segment exists as a row, yet no per-user row was written for it
    assert await pool.fetchval("SELECT count(*) FROM memberships WHERE segment_id = $1", rollout) == 0


async def test_user_never_seen_is_covered_by_rollout(api, pool):
    await add_segment(pool, "HALF", 50)
    await api.app.state.resources.rollout.refresh()
    covered = user_in_buckets("HALF", 0, 5000)
    outside = user_in_buckets("HALF", 5000, 10000)
    assert [s["slug"] for s in (await api.get(f"/users/{covered}/segments")).json()["segments"]] == ["HALF"]
    assert (await api.get(f"/users/{outside}/segments")).json()["segments"] == []


@pytest.mark.parametrize("bad", ["0", "-1", "abc", str(2**63), "1.5"])
async def test_bad_user_ids_are_422(api, bad):
    for path in (f"/users/{bad}/segments", f"/users/{bad}", f"/users/{bad}/history?year=2026&month=1"):
        response = await api.get(path)
        assert response.status_code == 422, path
        assert "user_id" in response.text


async def test_user_registration(api, pool):
    await pool.execute("INSERT INTO users VALUES (1000, $1)", NOW)
    body = (await api.get("/users/1000")).json()
    assert body["user_id"] == 1000 and body["registered_at"].startswith(NOW.strftime("%Y-%m-%dT%H:%M:%S"))
    missing = await api.get("/users/1001")
    assert missing.status_code == 404 and "never been seen" in missing.json()["detail"]


async def test_segments_list_and_one(api, pool):
    await add_segment(pool, "B", 12.5)
    await add_segment(pool, "A")
    await add_segment(pool, "C", deleted=True)
    listed = (await api.get("/segments")).json()["segments"]
    assert [s["slug"] for s in listed] == ["A", "B"]
    one = (await api.get("/segments/B")).json()
    assert one["percent"] == 12.5 and one["description"] is None and one["created_at"].endswith("Z")
    assert (await api.get("/segments/C")).status_code == 404
    assert (await api.get("/segments/NOPE")).status_code == 404
    assert (await api.get("/segments/bad%20slug")).status_code == 422


async def test_command_status(api, pool):
    await pool.execute(
        "INSERT INTO command_outcomes VALUES ('c-1', 'create_user', 'applied', NULL, '{\"user_id\": 1}'::jsonb, "
        "'2026-11-28T10:00:00.123Z', 'assignments.commands', 3, 1042)")
    body = (await api.get("/commands/c-1")).json()
    token = body.pop("consistency_token")
    assert parse_lsn(token) >= parse_lsn(await pool.fetchval("SELECT pg_current_wal_lsn()::text")) - 10**6
    assert body == {"command_id": "c-1", "type": "create_user", "status": "applied", "error": None,
                    "result": {"user_id": 1}, "processed_at": "2026-11-28T10:00:00.123Z",
                    "source": {"topic": "assignments.commands", "partition": 3, "offset": 1042}, "actor": None}
    assert (await api.get("/commands/unknown")).status_code == 404


async def _download(api, link: str):
    parts = urlsplit(link)
    assert parts.scheme == "http" and parts.netloc == "api.test"  # absolute, on this API
    return await api.get(f"{parts.path}?{parts.query}")


async def test_report_csv_header_order_and_content(api, pool):
    rows = [
        (1001, "B", "I", datetime(2023, 9, 2, 8, 0, 0, tzinfo=UTC), "manual", "manual"),
        (1000, "B", "I", datetime(2023, 9, 2, 8, 0, 0, tzinfo=UTC), "manual", "manual"),
        (1000, "A", "I", datetime(2023, 9, 2, 8, 0, 0, tzinfo=UTC), "manual", "manual"),
        (1000, "A", "D", datetime(2023, 9, 30, 23, 59, 59, tzinfo=UTC), "manual", "ttl"),
        (1000, "A", "I", datetime(2023, 10, 1, 0, 0, 0, tzinfo=UTC), "manual", "manual"),  # next month
        (1000, "A", "I", datetime(2023, 8, 31, 23, 59, 59, tzinfo=UTC), "manual", "manual"),  # previous
    ]
    await pool.copy_records_to_table("membership_history", records=rows, columns=(
        "user_id", "segment_slug", "operation", "executed_at", "source", "reason"))
    link = (await api.get("/reports/history", params={"year": 2023, "month": 9})).json()["report_link"]
    response = await _download(api, link)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.text.splitlines() == [
        "user_id,segment_slug,operation,executed_at,source,reason",
        "1000,A,I,2023-09-02 08:00:00,manual,manual",
        "1000,B,I,2023-09-02 08:00:00,manual,manual",
        "1001,B,I,2023-09-02 08:00:00,manual,manual",
        "1000,A,D,2023-09-30 23:59:59,manual,ttl",
    ]
    one = (await api.get("/users/1001/history", params={"year": 2023, "month": 9})).json()["report_link"]
    assert (await _download(api, one)).text.splitlines()[1:] == ["1001,B,I,2023-09-02 08:00:00,manual,manual"]


@pytest.mark.parametrize(("params", "mentions"), [
    ({"month": 9}, "year"), ({"year": 2023}, "month"), ({"year": 1969, "month": 1}, "year"),
    ({"year": 10000, "month": 1}, "year"), ({"year": 2023, "month": 0}, "month"),
    ({"year": 2023, "month": 13}, "month"), ({"year": "x", "month": 1}, "year"),
])
async def test_report_year_and_month_are_validated(api, params, mentions):
    for path in ("/reports/history", "/users/1000/history"):
        response = await api.get(path, params=params)
        assert response.status_code == 422
        assert mentions in response.text


async def test_tampered_and_expired_links(api, settings):
    link = (await api.get("/reports/history", params={"year": 2023, "month": 9})).json()["report_link"]
    token = link.split("token=")[1]
    payload, timestamp, signature = token.split(".")
    forged = orjson.dumps({"y": 2023, "m": 9, "u": 1}).hex()
    flipped = signature[:5] + ("B" if signature[5] != "B" else "C") + signature[6:]
    for bad in (f"{payload}.{timestamp}.{flipped}", f"{forged}.{timestamp}.{signature}", "x", ""):
        response = await api.get("/reports/download", params={"token": bad})
        assert response.status_code == 403, bad
    # Same secret, 1-second lifetime: a link signed 2 s ago has expired.
    old = ReportSigner(settings.report_signing_secret.get_secret_value(), 1).sign(2023, 9, None)
    await asyncio.sleep(2.1)
    api.app.state.resources.signer = ReportSigner(settings.report_signing_secret.get_secret_value(), 1)
    response = await api.get("/reports/download", params={"token": old})
    assert response.status_code == 410 and "expired" in response.json()["detail"]


async def test_a_large_report_streams_without_loading_it_whole(pool):
    await pool.execute(
        """INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, reason)
           SELECT g, 'SEGMENT_' || (g % 50), 'I', '2023-09-01'::timestamptz + g * interval '1 second',
                  'manual', 'manual'
           FROM generate_series(1, 100000) AS g""")
    tracemalloc.start()
    lines = chunks = 0
    try:
        conn = await pool.acquire()
        async for chunk in stream_report(conn, 2023, 9, None, release=lambda: pool.release(conn)):
            chunks += 1
            lines += chunk.count(b"\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == 100_001
    assert chunks > 20  # delivered piecewise as the cursor advances (about 2,700 lines a chunk)
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes: the report was held in memory"


async def test_post_command_publishes_to_its_topic_with_its_key(api, settings, pool):
    response = await api.post("/commands", json={"type": "create_segment", "slug": "AVITO_VOICE_MESSAGES"})
    assert response.status_code == 202
    published = response.json()
    assert published["topic"] == settings.segments_commands_topic and published["command_id"]
    response = await api.post("/commands", json={"type": "update_user_segments", "user_id": 1000,
                                                 "add": ["AVITO_VOICE_MESSAGES"], "command_id": "http-1"})
    assert response.status_code == 202 and response.json()["command_id"] == "http-1"
    records = await read_topic(settings, settings.assignments_commands_topic, 1)
    assert records[0].key == b"1000" and records[0].partition == response.json()["partition"]
    assert records[0].offset == response.json()["offset"]
    async with running_consumer(settings, pool):
        outcomes = await wait_for_outcomes(pool, [published["command_id"], "http-1"])
    assert outcomes["http-1"]["status"] == "applied"
    assert (await api.get("/commands/http-1")).json()["status"] == "applied"
    segments = (await api.get("/users/1000/segments")).json()["segments"]
    assert [s["slug"] for s in segments] == ["AVITO_VOICE_MESSAGES"]


@pytest.mark.parametrize(("body", "mentions"), [
    (b"not json", "JSON"), (b"[1]", "object"), (b'{"type": "nope"}', "type"),
    (b'{"type": "create_user", "user_id": 0}', "user_id"),
    (b'{"type": "update_user_segments", "user_id": 1, "ttl_seconds": 5, "expires_at": "2999-01-01T00:00:00Z"}',
     "not both"),
    # The audit's terminal injection through `segmentctl tail`.
    (b'{"type": "create_user", "user_id": 1, "command_id": "x\\n{\\"event\\":\\"FAKE\\"}\\u001b[2J"}',
     "control characters"),
])
async def test_post_command_refuses_invalid_commands(api, body, mentions):
    response = await api.post("/commands", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert mentions in response.text


async def test_post_command_over_one_mebibyte_is_413(api):
    body = b'{"type": "create_user", "user_id": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}'
    response = await api.post("/commands", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


async def test_post_command_and_readiness_when_kafka_is_unreachable(settings):
    import httpx

    from devstack.processes import free_port

    app = create_app(settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post("/commands", json={"type": "create_user", "user_id": 1})
            assert response.status_code == 503 and "Kafka" in response.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"] == "ok" and ready.json()["checks"]["kafka"] != "ok"
            assert (await client.get("/healthz")).status_code == 200


async def test_health_readiness_and_metrics(api):
    assert (await api.get("/healthz")).json()["status"] == "ok"
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "kafka": "ok"}
    await api.get("/users/5/segments")
    await api.get("/metrics")
    text = (await api.get("/metrics")).text
    assert 'segmentation_http_requests_total{method="GET",route="/users/{user_id}/segments",status="200"}' in text
    assert 'route="/metrics"' not in text
    assert "segmentation_http_request_seconds_bucket" in text


async def test_asyncapi_document_is_served_for_the_configured_topics(api):
    page = await api.get("/asyncapi")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "AsyncApiStandalone" in page.text and "try-it" not in page.text
    document = yaml.safe_load((await api.get("/asyncapi.yaml")).text)
    settings = api.app.state.resources.kafka
    assert {channel["address"] for channel in document["channels"].values()} == {
        settings.segments_commands_topic, settings.assignments_commands_topic, settings.results_topic,
        settings.dlq_topic, settings.membership_changes_topic}
    assert (await api.get("/asyncapi.json")).json() == document


async def test_docs_and_openapi_have_an_example_for_every_endpoint(api):
    assert (await api.get("/docs")).status_code == 200
    spec = (await api.get("/openapi.json")).json()
    paths = set(spec["paths"])
    assert {"/users/{user_id}/segments", "/users/{user_id}", "/segments", "/segments/{slug}",
            "/users/{user_id}/history", "/reports/history", "/reports/download", "/commands/{command_id}",
            "/commands", "/healthz", "/readyz", "/metrics"} <= paths
    body = spec["paths"]["/commands"]["post"]["requestBody"]["content"]["application/json"]
    assert body["examples"]
    # The request schema is the command union itself, so clients and fuzzers see every field rule.
    assert body["schema"]["discriminator"]["propertyName"] == "type"
    assert {"CreateSegment", "UpdateSegment", "DeleteSegment", "CreateUser", "UpdateUserSegments"} <= set(
        spec["components"]["schemas"])
    assert spec["components"]["schemas"]["UpdateUserSegments"]["not"] == {"required": ["ttl_seconds", "expires_at"]}


async def test_report_links_never_name_a_host_the_client_made_up(api):
    """Without API_PUBLIC_URL a link names the request's host only when REPORT_LINK_HOSTS lists it;
    for any other Host header it names the address the request reached."""
    for host, expected in (("attacker.example", "http://api.test/"), ("localhost:8080", "http://localhost:8080/")):
        link = (await api.get("/reports/history?year=2026&month=11", headers={"Host": host})).json()["report_link"]
        assert link.startswith(expected + "reports/download?token="), (host, link)


@pytest.mark.parametrize("path", ["/docs", "/asyncapi"])
async def test_documentation_pages_load_only_pinned_assets_with_integrity_hashes(api, path):
    page = (await api.get(path)).text
    external = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"https?://[^\"]+\"[^>]*>", page)
    scripts = [tag for tag in external if "stylesheet" in tag or tag.startswith("<script")]
    assert scripts, page[:500]
    for tag in scripts:
        assert re.search(r'integrity="sha384-[A-Za-z0-9+/=]{64}" crossorigin="anonymous"', tag), tag
        assert re.search(r"@\d+\.\d+\.\d+/", tag), tag  # an exact version, never a range


async def test_a_status_read_can_wait_for_its_outcome(api, settings, pool):
    assert (await api.get("/commands/later", params={"wait": 0})).status_code == 404  # at once: not yet
    async with running_consumer(settings, pool):
        published = await api.post("/commands", json={"type": "create_user", "user_id": 5, "command_id": "later"})
        assert published.status_code == 202
        waited = await api.get("/commands/later", params={"wait": 20})  # no retry loop on the caller's side
    assert waited.status_code == 200 and waited.json()["status"] == "applied"
    assert (await api.get("/commands/later", params={"wait": 31})).status_code == 422


async def test_a_422_says_each_problem_in_words_beside_its_structure(api):
    bad = await api.post("/commands", json={"type": "update_user_segments", "user_id": 0, "add": [""]})
    assert bad.status_code == 422
    assert bad.json()["message"] == "user_id: must be at least 1; add[0]: must not be empty"
    assert {tuple(problem["loc"]) for problem in bad.json()["detail"]} == {
        ("update_user_segments", "user_id"), ("update_user_segments", "add", 0)}
    month = await api.get("/reports/history", params={"year": 2026, "month": 13})
    assert month.status_code == 422 and month.json()["message"] == "month: must be at most 12"


async def test_a_bad_path_parameter_is_said_in_words(api):
    response = await api.get("/users/abc/segments")  # the route answers what the fast path does not take
    assert response.status_code == 422 and response.json()["message"] == "user_id: must be a whole number"
