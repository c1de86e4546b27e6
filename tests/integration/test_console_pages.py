"""The console's pages as a product: finding a segment among many (search, sort, keyset pages),
forms that keep what was typed, outcomes shown where the change was made, command pages that
link back to what they changed and never poll for an id nobody sent, and times as people read them."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from datetime import UTC, date, datetime, timedelta
from html import unescape

import pytest

from tests.integration.test_console import console, csrf_of
from tests.support import Publisher, running_consumer, wait_for_count, wait_for_outcomes

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


async def every_page(client, url: str, rows: re.Pattern = ROW_SLUG) -> list[list[str]]:
    pages = []
    while url:
        page = await client.get(url)
        assert page.status_code == 200, page.text
        pages.append(rows.findall(page.text))
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
        # By size: memberships written straight into the table are counted as the consumer's are.
        sizes = {slug: number % 13 for number, (slug, _) in enumerate(seeded)}
        await pool.execute("""INSERT INTO memberships (user_id, segment_id, added_at)
                              SELECT u, s.id, now() FROM segments s, generate_series(1, 12) AS u
                              WHERE s.deleted_at IS NULL AND u <= substr(s.slug, 5)::int % 13""")
        by_size = await every_page(client, "/ui/segments?sort=size")
        assert list(itertools.chain(*by_size)) == sorted(sizes, key=lambda slug: (-sizes[slug], slug))
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
                           ({"sort": "size", "after": "many:SEG_0001"}, "is not a position in the list"),
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


COMMAND_ROW = re.compile(r'<th scope="row"><a href="/ui/commands/[^"]+">([^<]+)</a></th>')


async def test_activity_lists_commands_newest_first_filtered_and_paged_with_links_to_what_they_changed(
        settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "VOICE", "command_id": "seg", "actor": "ana"})
        await wait_for_outcomes(pool, ["seg"])
        users = [{"type": "create_user", "user_id": n, "command_id": f"user-{n:03d}", "actor": "batch"}
                 for n in range(1, 61)]
        await publish.users(users)
        await wait_for_outcomes(pool, [c["command_id"] for c in users])
        await publish.user({"type": "update_user_segments", "user_id": 7, "add": ["NOPE"], "command_id": "bad",
                            "actor": "ana"})
        await wait_for_outcomes(pool, ["bad"])
    async with console(settings) as client:
        everything = await every_page(client, "/ui/activity", COMMAND_ROW)
        assert [len(page) for page in everything] == [50, 12]
        listed = list(itertools.chain(*everything))
        assert sorted(listed) == sorted(["seg", "bad", *(c["command_id"] for c in users)])  # each once
        assert listed[0] == "bad" and listed[-1] == "seg"  # newest first
        rejected = (await client.get("/ui/activity", params={"status": "rejected"})).text
        assert COMMAND_ROW.findall(rejected) == ["bad"]
        assert '<a href="/ui/users/7">user 7</a>' in rejected and "no live segment: NOPE" in rejected
        by_ana = await client.get("/ui/activity", params={"actor": "ana"})
        assert COMMAND_ROW.findall(by_ana.text) == ["bad", "seg"]
        assert '<a href="/ui/segments/VOICE">VOICE</a>' in by_ana.text
        segments_only = await client.get("/ui/activity", params={"type": "create_segment"})
        assert COMMAND_ROW.findall(segments_only.text) == ["seg"]
        about_user = await client.get("/ui/activity", params={"user": 7})
        assert COMMAND_ROW.findall(about_user.text) == ["bad", "user-007"]
        about_segment = await client.get("/ui/activity", params={"segment": "VOICE"})
        assert COMMAND_ROW.findall(about_segment.text) == ["seg"]
        future = await client.get("/ui/activity", params={"since": "2999-01-01"})
        assert COMMAND_ROW.findall(future.text) == [] and "No command matches" in future.text
        assert 'href="/ui/activity?user=7">Every command about user 7' in (await client.get("/ui/users/7")).text
        for bad, words in (({"status": "lost"}, "is not a status"), ({"type": "drop"}, "is not a command type"),
                           ({"since": "yesterday"}, "is not a time"), ({"after": "x"}, "is not a position")):
            response = await client.get("/ui/activity", params=bad)
            assert response.status_code == 422 and words in unescape(response.text), bad


DAY_GROUP = re.compile(r'<g class="day" data-day="([^"]+)" data-entries="(\d+)" data-exits="(\d+)" '
                       r'data-members="(-?\d+)"')


async def test_a_segments_page_charts_its_history_lists_its_rollout_and_pages_its_members(settings, pool):
    async with Publisher(settings) as publish, running_consumer(settings, pool):
        await publish.segment({"type": "create_segment", "slug": "S", "percent": 10, "command_id": "s-created"})
        await wait_for_outcomes(pool, ["s-created"])
        await publish.segment({"type": "update_segment", "slug": "S", "percent": 20, "command_id": "s-20",
                               "actor": "ana"})
        await wait_for_outcomes(pool, ["s-20"])
        # Days before today, written as the consumer would have: entries with their memberships, an exit.
        segment_id = await pool.fetchval("SELECT id FROM segments WHERE slug = 'S' AND deleted_at IS NULL")
        today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        five, three = today - timedelta(days=5), today - timedelta(days=3)
        await pool.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                               "reason) VALUES ($1, 'S', $2, $3, 'manual', 'manual')",
                               [(u, "I", five) for u in (1001, 1002, 1003, 1004)] + [(1004, "D", three)])
        await pool.executemany("INSERT INTO memberships (user_id, segment_id, added_at) VALUES ($1, $2, $3)",
                               [(u, segment_id, five) for u in (1001, 1002, 1003)])
        adds = [{"type": "update_user_segments", "user_id": u, "add": ["S"], "command_id": f"a{u}"}
                for u in range(1, 61)]
        await publish.users(adds)
        await wait_for_outcomes(pool, [c["command_id"] for c in adds])
        removes = [{"type": "update_user_segments", "user_id": u, "remove": ["S"], "command_id": f"r{u}"}
                   for u in range(1, 6)]
        await publish.users(removes)
        await wait_for_outcomes(pool, [c["command_id"] for c in removes])

    history = await pool.fetch("SELECT (executed_at AT TIME ZONE 'UTC')::date AS day, operation FROM "
                               "membership_history WHERE segment_slug = 'S'")
    async with console(settings) as client:
        page = (await client.get("/ui/segments/S")).text
        days = [(date.fromisoformat(d), int(i), int(o), int(m)) for d, i, o, m in DAY_GROUP.findall(page)]
        assert len(days) == 30 and days[-1][0] == today.date()
        for day, entries, exits, members in days:  # each day against the history rows themselves
            assert entries == sum(1 for row in history if row["day"] == day and row["operation"] == "I"), day
            assert exits == sum(1 for row in history if row["day"] == day and row["operation"] == "D"), day
            assert members == sum(1 if row["operation"] == "I" else -1 for row in history if row["day"] <= day), day
        # A user the rollout already covered enters nothing when added by hand: fewer entries than adds.
        entered_today = sum(1 for row in history if row["day"] == today.date() and row["operation"] == "I")
        assert 40 <= entered_today < 60 and days[-6][1:] == (4, 0, 4) and days[-4][1:] == (0, 1, 3)
        assert '<svg class="chart"' in page and 'role="img"' in page and '<title id="chart-title">S: entries' in page
        assert (f"{entered_today + 4} entries and {days[-1][2] + 1} exits; explicit members went from 0 to "
                f"{days[-1][3]}") in page  # its description
        assert "<caption id=\"days-caption\">S, 30 days</caption>" in page  # the table behind it

        rollout = page[page.index('id="rollout"'):page.index('id="members"')]
        assert rollout.index("10 % → 20 %") < rollout.index("0 % → 10 %")  # newest first
        assert '<a href="/ui/commands/s-20">s-20</a>' in rollout and "<td>ana</td>" in rollout

        member_pages = await every_page(client, "/ui/segments/S", re.compile(
            r'<tr><th scope="row"><a href="/ui/users/(\d+)">'))
        assert [len(p) for p in member_pages] == [50, 8]
        members = [int(u) for u in itertools.chain(*member_pages)]
        assert sorted(members) == sorted([*range(6, 61), 1001, 1002, 1003])
        assert members[-3:] == [1003, 1002, 1001]  # the earliest added last

        ninety = (await client.get("/ui/segments/S", params={"period": "90d"})).text
        assert len(DAY_GROUP.findall(ninety)) == 90
        month = (await client.get("/ui/segments/S", params={"period": "2025-02"})).text
        assert [d for d, *_ in DAY_GROUP.findall(month)] == [f"2025-02-{n:02d}" for n in range(1, 29)]
        for bad in ({"period": "2026-13"}, {"period": "7d"}, {"members_after": "soon|x"}):
            response = await client.get("/ui/segments/S", params=bad)
            assert response.status_code == 422, bad


async def test_a_segments_daily_history_is_read_from_its_index_on_the_months_it_spans(pool):
    plan = "\n".join(row[0] for row in await pool.fetch(
        "EXPLAIN SELECT (executed_at AT TIME ZONE 'UTC')::date, count(*) FROM membership_history "
        "WHERE segment_slug = 'S' AND executed_at >= now() - interval '30 days' AND executed_at < now() GROUP BY 1"))
    assert "_segment" in plan and "Seq Scan" not in plan, plan
    assert await pool.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'membership_history_segment'::regclass")


async def test_a_users_month_of_history_is_paged_with_its_reasons_in_words(settings, pool):
    now = datetime.now(UTC)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    await pool.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, source, "
                           "reason) VALUES (9, $1, $2, $3, 'manual', $4)",
                           [(f"S{n:03d}", "I" if n % 2 == 0 else "D", first + (now - first) * n / 160,
                             "manual" if n % 2 == 0 else "ttl") for n in range(150)])
    async with console(settings) as client:
        slugs = re.compile(r'<td><a href="/ui/segments/(S\d+)">')
        one = (await client.get("/ui/users/9")).text
        assert slugs.findall(one) == [f"S{n:03d}" for n in range(100)]  # oldest first
        assert "its time to live ended" in one and "by a command" in one
        later = re.search(r'<a href="([^"]+)" rel="next">Later</a>', one)
        two = (await client.get(unescape(later[1]))).text
        assert slugs.findall(two) == [f"S{n:03d}" for n in range(100, 150)] and 'rel="next"' not in two
        assert (await client.get("/ui/users/9", params={"page": 0})).status_code == 422


async def test_each_row_of_a_users_month_links_to_the_command_behind_it(settings, pool):
    from services.expiry_worker.worker import ExpiryWorker

    async with Publisher(settings) as publish, running_consumer(settings, pool):
        for slug, percent in (("A", 0), ("B", 0), ("ROLL", 100)):
            await publish.segment({"type": "create_segment", "slug": slug, "percent": percent,
                                   "command_id": f"create-{slug}"})
        await wait_for_outcomes(pool, ["create-A", "create-B", "create-ROLL"])
        await publish.user({"type": "update_user_segments", "user_id": 77, "add": ["A"], "command_id": "add-a"})
        await publish.user({"type": "update_user_segments", "user_id": 77, "add": ["B"], "ttl_seconds": 1,
                            "command_id": "add-b"})
        await wait_for_outcomes(pool, ["add-a", "add-b"])
    await asyncio.sleep(1.1)
    worker = ExpiryWorker(pool, batch_size=10, max_sleep_seconds=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await wait_for_count(pool, "SELECT count(*) FROM membership_history WHERE reason = 'ttl'", 1)
    finally:
        worker.stop()
        await running
    async with console(settings) as client:
        page = (await client.get("/ui/users/77")).text
    row = re.compile(r'<td><a href="/ui/segments/(\w+)">\w+</a></td>\s*<td>(entered|left)[^<]*</td>.*?'
                     r'<td>(?:<a href="/ui/commands/([\w-]+)">|<span class="muted">([^<]+)</span>)', re.S)
    assert sorted(row.findall(page)) == [
        ("A", "entered", "add-a", ""), ("B", "entered", "add-b", ""), ("B", "left", "", "none: it expired"),
        ("ROLL", "entered", "create-ROLL", "")]
