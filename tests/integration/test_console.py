"""The web console over HTTP (the browser path is tests/e2e/test_console_browser.py): sign-in and its
cookie, scopes, CSRF, revocation, production's switch, the import check, and a command's trace link."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from itsdangerous import URLSafeSerializer
from pydantic import SecretStr

from services.query_api.app import create_app
from shared.api_keys import new_key
from shared.assignments import parse_assignments
from shared.settings import DEVELOPMENT_REPORT_SECRET
from tests.integration.test_access_control import Keys
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


@asynccontextmanager
async def console(settings, **changes) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            client.app = app
            yield client


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, page.text
    return found[1]


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """Signs in with `key`; the session's CSRF token."""
    token = csrf_of(await client.get("/ui/signin"))
    response = await client.post("/ui/signin", data={"api_key": key, "csrf_token": token, "next": "/ui/segments"})
    assert response.status_code == 303, response.text
    return csrf_of(await client.get("/ui/segments"))


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "api-keys")


async def test_signing_in_gives_a_strict_httponly_cookie_and_the_keys_scopes(settings, keys):
    async with console(settings, api_keys_file=keys.path) as client:
        first = await client.get("/ui/segments")
        assert first.status_code == 303 and first.headers["location"] == "/ui/signin?next=%2Fui%2Fsegments"
        page = await client.get("/ui/signin")
        refused = await client.post("/ui/signin", data={"api_key": "not-a-key", "csrf_token": csrf_of(page)})
        assert refused.status_code == 401 and "not valid" in refused.text
        signed = await client.post("/ui/signin", data={"api_key": keys.keys["reader"], "csrf_token": csrf_of(page),
                                                       "next": "https://elsewhere.example/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/segments"  # never elsewhere
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert keys.keys["reader"] not in cookie  # the cookie names the key by its hash only
        segments = await client.get("/ui/segments")
        assert segments.status_code == 200 and "Signed in as <strong>reader</strong>" in segments.text
        assert "Create a segment" not in segments.text  # no write scope: no form
        token = csrf_of(segments)
        create = await client.post("/ui/segments", data={"slug": "A", "percent": "1", "csrf_token": token})
        assert create.status_code == 403 and "does not have the scope &#39;write&#39;" in create.text
        assert (await client.get("/ui/commands/x")).status_code == 403  # status scope
        assert (await client.get("/ui/import")).status_code == 403  # write scope


async def test_every_state_changing_form_needs_the_sessions_csrf_token(settings, keys):
    async with console(settings, api_keys_file=keys.path) as client, \
            console(settings, api_keys_file=keys.path) as other:
        # Signing in is protected too (login CSRF): no token, no session.
        blind = await client.post("/ui/signin", data={"api_key": keys.keys["admin"]})
        assert blind.status_code == 403 and "security token" in blind.text
        token = await sign_in(client, keys.keys["admin"])
        foreign = await sign_in(other, keys.keys["admin"])
        assert foreign != token
        forms = [("/ui/segments", {"slug": "A", "percent": "1"}), ("/ui/segments/A", {"percent": "2"}),
                 ("/ui/segments/A/delete", {}), ("/ui/users/1/segments", {"add": "A"}),
                 ("/ui/import/publish", {"content": "dXNlcl9pZCxzZWdtZW50X3NsdWcKMSxBCg=="}), ("/ui/signout", {})]
        for path, data in forms:
            for sent in (data, {**data, "csrf_token": foreign}, {**data, "csrf_token": ""}):
                response = await client.post(path, data=sent)
                assert response.status_code == 403 and "Form expired" in response.text, (path, sent)
        accepted = await client.post("/ui/segments", data={"slug": "A", "percent": "1", "csrf_token": token})
        assert accepted.status_code == 303 and accepted.headers["location"].startswith("/ui/commands/")


async def test_a_revoked_key_ends_its_sessions(settings, keys):
    async with console(settings, api_keys_file=keys.path) as client:
        await sign_in(client, keys.keys["reader"])
        assert (await client.get("/ui/segments")).status_code == 200
        keys.path.write_text("\n".join(line for line in keys.path.read_text().splitlines()
                                       if not line.startswith("reader:")) + "\n")
        client.app.state.resources.keys.reload()
        after = await client.get("/ui/segments")
        assert after.status_code == 303 and after.headers["location"].startswith("/ui/signin")


async def test_the_console_is_off_in_production_unless_ui_enabled(settings, keys):
    production = {"environment": "production", "api_keys_file": keys.path,
                  "report_signing_secret": SecretStr("a-secret-of-our-own"), "api_public_url": "https://seg.example"}
    async with console(settings, **production) as client:
        assert (await client.get("/ui/segments")).status_code == 404
        assert (await client.get("/ui/static/console.js")).status_code == 404
    async with console(settings, **production, ui_enabled=True) as client:
        response = await client.get("/ui/segments")
        assert response.status_code == 303
        page = await client.get("/ui/signin")
        assert "Secure" in page.headers["set-cookie"]  # the public URL is https
    async with console(settings, ui_enabled=False) as client:
        assert (await client.get("/ui/segments")).status_code == 404


async def test_without_keys_the_console_is_open_says_so_and_still_checks_forms(settings):
    async with console(settings) as client:
        page = await client.get("/ui/segments")
        assert page.status_code == 200 and "Access control is off" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert (await client.post("/ui/segments", data={"slug": "A"})).status_code == 403
        made = await client.post("/ui/segments", data={"slug": "A", "percent": "10", "csrf_token": csrf_of(page)})
        assert made.status_code == 303
        script = await client.get("/ui/static/console.js")
        assert script.status_code == 200 and "data-poll" in script.text  # served by the API, no CDN


async def test_bad_input_gets_a_page_that_says_what_is_wrong(settings):
    async with console(settings) as client:
        token = csrf_of(await client.get("/ui/segments"))
        bad_slug = await client.post("/ui/segments", data={"slug": "-A1", "percent": "1", "csrf_token": token})
        assert bad_slug.status_code == 422 and "must begin with a letter or a digit" in bad_slug.text
        assert "Value error" not in bad_slug.text  # in words, with no library's prefix
        bad_percent = await client.post("/ui/segments", data={"slug": "B", "percent": "ten", "csrf_token": token})
        assert bad_percent.status_code == 422 and "&#39;ten&#39; is not a number" in bad_percent.text
        for endless in ("Infinity", "NaN", "1e999999999"):
            response = await client.post("/ui/segments", data={"slug": "B", "percent": endless, "csrf_token": token})
            assert response.status_code == 422, (endless, response.text)
        bad_ttl = await client.post("/ui/users/5/segments", data={"add": "B", "ttl": "soon", "csrf_token": token})
        assert bad_ttl.status_code == 422 and 'id="ttl-error"' in bad_ttl.text  # next to its field
        nothing = await client.post("/ui/users/5/segments", data={"csrf_token": token})
        assert nothing.status_code == 422 and "name segments to add, or tick segments to remove" in nothing.text
        for not_an_id in ("abc", "9" * 5000, "١٢٣", "0", str(2**63)):
            user = await client.get("/ui/users", params={"user_id": not_an_id})
            assert user.status_code == 422 and "is not a user id" in user.text, not_an_id
        month = await client.get("/ui/users/5", params={"month": "2026-13"})
        assert month.status_code == 422 and "is not a month" in month.text
        assert (await client.get("/ui/segments/NOPE")).status_code == 404


async def test_an_import_is_checked_row_by_row_before_anything_is_published(settings):
    rows = "user_id,segment_slug,action,ttl\n1,A,add,2d\nx,A,add,\n2,A,drop,\n3,A B,add,\n4,A,remove,1d\n5,A,remove,\n"
    async with console(settings) as client:
        token = csrf_of(await client.get("/ui/import"))
        checked = await client.post("/ui/import", data={"csrf_token": token},
                                    files={"file": ("people.csv", rows.encode(), "text/csv")})
        assert checked.status_code == 200
        text = checked.text
        assert "<strong>2</strong> valid rows, <strong>4</strong> invalid" in text
        problems = dict(re.findall(r'<tr><td class="number">(\d+)</td><td>(.*?)</td></tr>', text))
        assert set(problems) == {"3", "4", "5", "6"}
        assert "user_id &#39;x&#39;" in problems["3"] and "action &#39;drop&#39;" in problems["4"]
        assert "ttl only applies to add" in problems["6"]
        header_only = await client.post("/ui/import", data={"csrf_token": token},
                                        files={"file": ("bad.csv", b"id,slug\n1,A\n", "text/csv")})
        assert header_only.status_code == 422 and "the header must name user_id, segment_slug" in header_only.text


async def test_a_commands_page_shows_its_outcome_and_links_to_its_trace(settings, pool):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.user({"type": "update_user_segments", "user_id": 7, "add": ["NOPE"], "command_id": "traced"},
                           headers=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())])
        await publish.user({"type": "create_user", "user_id": 8, "command_id": "untraced"})
        await wait_for_outcomes(pool, ["traced", "untraced"])
    async with console(settings, ui_trace_url="http://jaeger.example/trace/{trace_id}") as client:
        page = await client.get("/ui/commands/traced")
        assert "<strong>rejected</strong>" in page.text and "segment_not_found" in page.text
        assert f'href="http://jaeger.example/trace/{trace_id}"' in page.text
        assert "offset 0" in page.text and "Consistency token" in page.text
        plain = await client.get("/ui/commands/untraced")
        assert "<strong>applied</strong>" in plain.text and "carries no trace context" in plain.text
        fragment = await client.get("/ui/commands/traced/outcome")
        assert fragment.headers.get("x-poll-done") == "1"
        waiting = await client.get("/ui/commands/not-yet/outcome")
        assert "x-poll-done" not in waiting.headers and "Waiting for the outcome" in waiting.text
    async with console(settings) as client:  # no UI_TRACE_URL: no trace row at all
        assert "Trace" not in (await client.get("/ui/commands/traced")).text


async def test_a_key_with_every_scope_sees_history_and_a_download_link(settings, pool, keys, tmp_path):
    key, line = new_key("support", ["read", "status"])
    keys.path.write_text(keys.path.read_text() + line + "\n")
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "S", "command_id": "s"})
        await wait_for_outcomes(pool, ["s"])
        await publish.user({"type": "update_user_segments", "user_id": 9, "add": ["S"], "command_id": "u"})
        await wait_for_outcomes(pool, ["u"])
    async with console(settings, api_keys_file=keys.path) as client:
        await sign_in(client, keys.keys["admin"])
        page = await client.get("/ui/users/9")
        assert "<th scope=\"row\">S</th>" in page.text and "added by hand" in page.text
        link = re.search(r'<a href="([^"]+)" download>', page.text)[1]
        csv = await client.get(link)
        assert csv.status_code == 200 and csv.text.splitlines()[1].startswith("9,S,I,")
        assert ">entered (I)<" in page.text
    async with console(settings, api_keys_file=keys.path) as client:
        await sign_in(client, key)  # no reports scope: no history, said plainly
        page = await client.get("/ui/users/9")
        assert "does not have the <code>reports</code> scope" in page.text and " download>" not in page.text


async def test_a_key_that_may_write_but_not_see_outcomes_is_told_its_command_was_published(settings, keys):
    async with console(settings, api_keys_file=keys.path) as client:
        token = await sign_in(client, keys.keys["writer"])  # write only: no status, no read
        made = await client.post("/ui/segments", data={"slug": "W", "percent": "5", "csrf_token": token})
        assert made.status_code == 202 and "was published" in made.text and "status</code> scope" in made.text
        command_id = re.search(r"The command <code>([^<]+)</code>", made.text)[1]
        assert (await client.get(f"/ui/commands/{command_id}")).status_code == 403
        csv = b"user_id,segment_slug\n1,W\n2,W\nx,W\n"
        checked = await client.post("/ui/import", data={"csrf_token": token},
                                    files={"file": ("w.csv", csv, "text/csv")})
        content = re.search(r'name="content" value="([^"]+)"', checked.text)[1]
        imported = await client.post("/ui/import/publish", data={"csrf_token": token, "content": content})
        assert imported.status_code == 202 and "2 rows were published (1 invalid, not published)" in imported.text


async def test_signing_out_ends_every_session_of_that_key(settings, keys):
    """The audit's finding: a cookie kept from before signing out still worked until it expired."""
    async with console(settings, api_keys_file=keys.path) as client, \
            console(settings, api_keys_file=keys.path) as elsewhere:
        token = await sign_in(client, keys.keys["reader"])
        await sign_in(elsewhere, keys.keys["reader"])  # the same key in another browser
        kept = client.cookies.get("segmentation_console")
        out = await client.post("/ui/signout", data={"csrf_token": token})
        assert out.status_code == 303 and out.headers["location"] == "/ui/signin"
        client.cookies.set("segmentation_console", kept, path="/ui")  # the old cookie, replayed
        for browser in (client, elsewhere):
            after = await browser.get("/ui/segments")
            assert after.status_code == 303 and after.headers["location"].startswith("/ui/signin"), after.text
        client.cookies.clear()
        await sign_in(client, keys.keys["reader"])  # signing in again works at once
        assert (await client.get("/ui/segments")).status_code == 200


async def test_the_import_check_lists_a_bounded_number_of_rows_off_the_event_loop(settings, monkeypatch):
    from services.query_api.console.routes import imports as pages

    threads = []

    def parse(*args):
        threads.append(threading.current_thread())
        return parse_assignments(*args)

    monkeypatch.setattr(pages, "parse_assignments", parse)
    rows = "user_id,segment_slug\n" + "x,A\n" * 20_000
    async with console(settings) as client:
        token = csrf_of(await client.get("/ui/import"))
        checked = await client.post("/ui/import", data={"csrf_token": token},
                                    files={"file": ("bad.csv", rows.encode(), "text/csv")})
    assert checked.status_code == 200
    assert "<strong>20,000</strong> invalid" in checked.text and "the first 200 of 20,000" in checked.text
    assert len(re.findall(r'<tr><td class="number">', checked.text)) == pages.PROBLEMS_SHOWN
    assert len(checked.content) < 100_000
    assert threads and threading.main_thread() not in threads


async def test_a_file_too_large_to_publish_is_refused_at_the_check(settings):
    rows = b"user_id,segment_slug\n" + b"1,A\n" * 45_000  # 180 KB: in base64, over the limit
    async with console(settings, max_request_body_bytes=200_000) as client:
        token = csrf_of(await client.get("/ui/import"))
        checked = await client.post("/ui/import", data={"csrf_token": token},
                                    files={"file": ("big.csv", rows, "text/csv")})
    assert checked.status_code == 413 and "segmentctl import" in checked.text and "Publish" not in checked.text


async def test_an_import_token_forged_with_the_public_default_is_refused(settings):
    forged = URLSafeSerializer(
        hmac.new(DEVELOPMENT_REPORT_SECRET.encode(), b"console-import-v1", hashlib.sha256).digest(),
        salt="console-import-v1").dumps({"d": "0" * 16, "r": [[1, 1_000_000]], "i": 0})
    async with console(settings) as client:
        page = await client.get(f"/ui/import/{forged}")
    assert page.status_code == 404 and "No such import" in page.text


async def test_the_console_has_an_icon(settings):
    async with console(settings) as client:
        page = await client.get("/ui/segments")
        assert 'rel="icon"' in page.text
        for path in ("/ui/static/favicon.svg", "/favicon.ico"):
            icon = await client.get(path)
            assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
