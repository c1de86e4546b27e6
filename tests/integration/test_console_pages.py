"""The console's pages as a product: finding a segment among many (search, sort, keyset pages),
forms that keep what was typed, outcomes shown where the change was made, command pages that
link back to what they changed and never poll for an id nobody sent, and times as people read them."""

from __future__ import annotations

import itertools
import re
import time
from html import unescape

import pytest

from tests.integration.test_console import console, csrf_of
from tests.support import Publisher, running_consumer, wait_for_outcomes

pytestmark = pytest.mark.integration
NEXT = re.compile(r'<a href="([^"]+)" rel="next">')
ROW_SLUG = re.compile(r'<th scope="row"><a href="/ui/segments/[^"]+">([^<]+)</a></th>')


async def seed_segments(pool, count: int) -> list[tuple[str, float]]:
    """`count` live segments SEG_0000 …, percents cycling 0–9, one deleted segment; (slug, percent)."""
    rows = [(f"SEG_{number:04d}", number % 10, "the blue team" if number % 7 == 0 else None)
            for number in range(count)]
    await pool.executemany("INSERT INTO segments (slug, percent, description, created_at, updated_at) "
                           "VALUES ($1, $2, $3, now(), now())", rows)
    await pool.execute("INSERT INTO segments (slug, created_at, updated_at, deleted_at) "
                       "VALUES ('SEG_DELETED', now(), now(), now())")
    return [(slug, percent) for slug, percent, _ in rows]


async def every_page(client, url: str) -> list[list[str]]:
    pages = []
    while url:
        page = await client.get(url)
        assert page.status_code == 200, page.text
        pages.append(ROW_SLUG.findall(page.text))
        found = NEXT.search(page.text)
        url = unescape(found[1]) if found else None
    return pages


async def test_segments_are_searched_sorted_and_paged_by_keyset(settings, pool):
    seeded = await seed_segments(pool, 120)
    async with console(settings) as client:
        by_slug = await every_page(client, "/ui/segments")
        assert [len(page) for page in by_slug] == [50, 50, 20]
        # each once, in order, none deleted
        assert list(itertools.chain(*by_slug)) == sorted(slug for slug, _ in seeded)
        by_percent = await every_page(client, "/ui/segments?sort=percent")
        expected = [slug for slug, _ in sorted(seeded, key=lambda row: (-row[1], row[0]))]
        assert list(itertools.chain(*by_percent)) == expected
        found = await client.get("/ui/segments", params={"q": "seg_011"})  # any case, part of the slug
        assert ROW_SLUG.findall(found.text) == [f"SEG_{n:04d}" for n in range(110, 120)]
        assert "10 live segments match" in found.text
        blue = await client.get("/ui/segments", params={"q": "BLUE team"})  # the description too
        assert ROW_SLUG.findall(blue.text) == [f"SEG_{n:04d}" for n in range(0, 120, 7)]
        literal = await client.get("/ui/segments", params={"q": "SEG_%"})  # wildcards taken literally
        assert ROW_SLUG.findall(literal.text) == [] and "No live segment matches" in literal.text
        assert "120 live segments" in (await client.get("/ui/segments")).text
        for bad, words in (({"sort": "size;drop"}, "is not an order of this list"),
                           ({"sort": "percent", "after": "SEG_0001"}, "is not a position in the list"),
                           ({"q": "x" * 201}, "Search for at most 200 characters")):
            response = await client.get("/ui/segments", params=bad)
            assert response.status_code == 422 and words in unescape(response.text), bad


async def test_a_refused_form_keeps_what_was_typed_and_says_what_is_wrong_at_the_field(settings):
    async with console(settings) as client:
        token = csrf_of(await client.get("/ui/segments"))
        response = await client.post("/ui/segments", data={"slug": "-A1", "percent": "12.5",
                                                           "description": "voice notes", "csrf_token": token})
        assert response.status_code == 422
        page = response.text
        assert 'value="-A1"' in page and 'value="12.5"' in page and 'value="voice notes"' in page
        slug_error = re.search(r'<p id="slug-error" class="field-error">(.*?)</p>', page, re.S)
        assert slug_error and "must begin with a letter or a digit" in slug_error[1]
        assert 'aria-invalid="true" aria-describedby="slug-error slug-help"' in page
        assert "Value error" not in page and "percent-error" not in page
        user = await client.post("/ui/users/5/segments", data={"add": "A, B", "ttl": "soon", "csrf_token": token})
        assert user.status_code == 422 and 'value="A, B"' in user.text and 'value="soon"' in user.text
        assert re.search(r'<p id="ttl-error" class="field-error">.*soon', user.text, re.S)


async def test_a_users_change_shows_its_outcome_on_the_user_page(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "VOICE", "command_id": "s"})
        await wait_for_outcomes(pool, ["s"])
        async with console(settings) as client:
            token = csrf_of(await client.get("/ui/users/5"))
            sent = await client.post("/ui/users/5/segments", data={"add": "VOICE", "csrf_token": token})
            assert sent.status_code == 303 and sent.headers["location"].startswith("/ui/users/5?command=")
            command_id = sent.headers["location"].split("=", 1)[1]
            await wait_for_outcomes(pool, [command_id])
            page = await client.get(sent.headers["location"])
            assert 'aria-current="page">Users<' in page.text  # still on the user, in the Users section
            assert "<strong>applied</strong> for <a href=\"/ui/users/5\">user 5</a>" in page.text
            assert "data-poll" not in page.text  # the outcome is in: nothing left to wait for
            assert '<th scope="row">VOICE</th>' in page.text  # and the page shows its effect
            rejected = await client.post("/ui/users/5/segments", data={"add": "NOPE", "csrf_token": token})
            rejected_id = rejected.headers["location"].split("=", 1)[1]
            pending = await client.get(rejected.headers["location"])
            if "data-poll" in pending.text:  # before the outcome: polled, and the page reloads when it comes
                assert "data-reload-when-done" in pending.text
            await wait_for_outcomes(pool, [rejected_id])
            page = (await client.get(rejected.headers["location"])).text
            assert "<strong>rejected</strong>" in page and 'href="/ui/segments/NOPE">NOPE</a>' in page
            assert "no live segment: NOPE" in page


async def test_a_commands_page_links_to_what_it_was_about_and_an_unknown_id_is_not_awaited(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.user({"type": "update_user_segments", "user_id": 42, "add": ["GONE", "ALSO"],
                            "command_id": "about"})
        await wait_for_outcomes(pool, ["about"])
    async with console(settings, outcome_retention=3600) as client:
        page = (await client.get("/ui/commands/about")).text
        assert '<a href="/ui/users/42">user 42</a>' in page
        assert 'href="/ui/segments/GONE">GONE</a>' in page and 'href="/ui/segments/ALSO">ALSO</a>' in page
        assert 'aria-current="page">Commands<' in page
        unknown = (await client.get("/ui/commands/nobody-sent-this")).text  # looked up: said so, looked for a while
        assert "No command <code>nobody-sent-this</code> has an outcome yet" in unknown
        assert "processed more than 1 hour ago and its outcome has been removed" in unknown  # the retention
        assert 'data-poll="/ui/commands/nobody-sent-this/outcome?looked_up=1"' in unknown
        fragment = await client.get("/ui/commands/nobody-sent-this/outcome", params={"looked_up": 1})
        assert "has an outcome yet" in fragment.text and "x-poll-done" not in fragment.headers
        just_sent = (await client.get("/ui/commands/in-flight", params={"user": 3, "sent": int(time.time())})).text
        assert 'data-poll="/ui/commands/in-flight/outcome"' in just_sent and "Waiting for the outcome" in just_sent
        assert '<a href="/ui/users/3">Back to user 3</a>' in just_sent and 'aria-current="page">Users<' in just_sent
        too_old = (await client.get("/ui/commands/in-flight", params={"sent": int(time.time()) - 7200})).text
        assert "data-poll" not in too_old and "No command <code>in-flight</code> has an outcome." in too_old


async def test_times_read_as_people_read_them_with_the_exact_moment_behind(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "T", "command_id": "t"})
        await wait_for_outcomes(pool, ["t"])
    async with console(settings) as client:
        segment = (await client.get("/ui/segments/T")).text
        created = re.search(r'<dt>Created</dt><dd><time datetime="([^"]+Z)" title="([^"]+ UTC)">([^<]+)</time>',
                            segment)
        assert created and created[3] in ("just now", *(f"{n} seconds ago" for n in range(10, 60)))
        command = (await client.get("/ui/commands/t")).text
        assert '<dt>Processed</dt><dd><time datetime="' in command
        assert "<pre>" not in command and "<dt>Slug</dt>" in command  # the result as fields, not JSON
