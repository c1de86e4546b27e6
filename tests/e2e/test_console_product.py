"""The console as people who run experiments use it, in headless Chromium against the services as
processes: finding one segment among 2,000, paging, a refused form that keeps what was typed, a
user's change shown in place, every page without sideways scrolling at 390 px, and axe-core
finding no serious or critical accessibility violation on any page. Screenshots of each page, wide
and narrow, go to the test artifacts (tests/browser.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.browser import FLAGS, artifacts_dir
from tests.support import Publisher, wait_for_outcomes

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
SEGMENTS = 2000
NARROW = {"width": 390, "height": 844}
SERIOUS = ("serious", "critical")


async def seed(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.copy_records_to_table(
            "segments", columns=["slug", "percent", "description", "created_at", "updated_at"],
            records=[(f"EXP_{n:04d}", n % 100, f"experiment {n} of the search team", *[_now()] * 2)
                     for n in range(SEGMENTS)])
        # EXP_0000 as if it had grown for a month: its size and its changes day by day, as the
        # count triggers and the expiry worker's folds leave them (its size 30 days ago: 300).
        segment = await conn.fetchval("UPDATE segments SET created_at = now() - interval '40 days' "
                                      "WHERE slug = 'EXP_0000' RETURNING id")
        await conn.execute("INSERT INTO segment_member_counts (segment_id, members) VALUES ($1, 764)", segment)
        await conn.execute("INSERT INTO segment_member_days (segment_id, day, change) "
                           "SELECT $1, (now() AT TIME ZONE 'UTC')::date - back, 30 - back "
                           "FROM generate_series(0, 29) AS back", segment)
    finally:
        await conn.close()


def _now():
    return datetime.now(UTC)


async def past_month_of(database_url: str, slug: str) -> None:
    """History rows for the 29 days before today: a few entries and exits a day, as a month of use."""
    today = _now().replace(hour=12, minute=0, second=0, microsecond=0)
    rows = [(2000 + day * 10 + n, slug, "I" if n < (day * 7) % 9 + 2 else "D", today - timedelta(days=day))
            for day in range(1, 30) for n in range((day * 7) % 9 + 2 + (day * 3) % 4)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany("INSERT INTO membership_history (user_id, segment_slug, operation, executed_at, "
                               "source, reason) VALUES ($1, $2, $3, $4, 'manual', 'manual')", rows)
    finally:
        await conn.close()


async def daily_history(database_url: str, slug: str) -> list[list]:
    """[day, entries, exits, members at the day's end] of the last 30 days, from the rows themselves."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT (executed_at AT TIME ZONE 'UTC')::date AS day, operation FROM "
                                "membership_history WHERE segment_slug = $1", slug)
    finally:
        await conn.close()
    today = _now().date()
    result = []
    for back in range(29, -1, -1):
        day = today - timedelta(days=back)
        entries = sum(1 for row in rows if row["day"] == day and row["operation"] == "I")
        exits = sum(1 for row in rows if row["day"] == day and row["operation"] == "D")
        members = sum(1 if row["operation"] == "I" else -1 for row in rows if row["day"] <= day)
        result.append([day.isoformat(), entries, exits, members])
    return result


async def test_the_console_finds_keeps_and_fits(chromium, console_stack):
    from axe_playwright_python.async_playwright import Axe
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=30_000)
    stack = console_stack
    shots = artifacts_dir("console-product")
    await seed(stack.settings.database_url)
    async with Publisher(stack.settings) as publish:
        await publish.segment({"type": "create_segment", "slug": "VOICE", "percent": 10, "command_id": "voice"})
        await publish.user({"type": "update_user_segments", "user_id": 1000, "add": ["VOICE"], "command_id": "u1"})
        await publish.user({"type": "update_user_segments", "user_id": 1000, "add": ["RETIRED"],
                            "command_id": "refused"})
    pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=1)
    try:
        await wait_for_outcomes(pool, ["voice", "u1", "refused"])
    finally:
        await pool.close()
    await past_month_of(stack.settings.database_url, "VOICE")
    axe, problems = Axe(), {}

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            context = await browser.new_context(base_url=stack.api_url(), viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            # The check can fail: an image without a text alternative is a critical violation.
            await page.set_content('<html lang="en"><title>t</title><main><img src="data:,"></main></html>')
            assert any(v["id"] == "image-alt" and v["impact"] == "critical"
                       for v in (await axe.run(page)).response["violations"])

            async def check(name: str) -> None:
                """axe on the page; then, at 390 px, nothing wider than the screen; screenshots of both."""
                found = await axe.run(page)
                serious = [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
                           for v in found.response["violations"] if v["impact"] in SERIOUS]
                if serious:
                    problems[name] = serious
                await page.screenshot(path=shots / f"{name}.png", full_page=True)
                await page.set_viewport_size(NARROW)
                overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                await page.screenshot(path=shots / f"{name}-390px.png", full_page=True)
                await page.set_viewport_size({"width": 1280, "height": 900})
                assert overflow <= 0, f"{name}: the page scrolls {overflow}px sideways at 390 px"

            await page.goto("/ui/signin")
            await check("01-sign-in")
            await page.keyboard.type(stack.api_key)
            await page.keyboard.press("Enter")
            await expect(page.get_by_role("heading", name="Segments", exact=True)).to_be_visible()

            # One segment among 2,000: search by part of its slug, in any case.
            await expect(page.get_by_role("table")).to_contain_text(f"{SEGMENTS + 1:,} live segments")
            # Each row's trend: EXP_0000 grew by 1, 2, … 30 a day; the line ends at its size now.
            trend = page.get_by_role("img", name=re.compile("EXP_0000: explicit members over the last 30 days"))
            await expect(trend).to_have_attribute("aria-label", re.compile(r"from 300 to 764 \(\+464\)"))
            await expect(page.get_by_role("row").nth(1)).to_contain_text("+464")
            await page.screenshot(path=shots / "readme-segments.png")  # for the docs
            await check("02-segments")
            await page.get_by_label("Search").fill("exp_1234")
            await page.keyboard.press("Enter")
            rows = page.get_by_role("table").get_by_role("row")
            await expect(rows).to_have_count(2)  # the header and the one found
            await expect(rows.nth(1)).to_contain_text("experiment 1234 of the search team")
            await check("03-segments-search")
            # Paging by percent, highest first: the next page starts where the first ended.
            await page.get_by_label("Search").fill("")
            await page.get_by_label("Sort by").select_option("percent")
            await page.get_by_role("button", name="Show").click()
            await expect(page).to_have_url(re.compile(r"sort=percent"))
            await page.wait_for_load_state()
            first = await page.get_by_role("row").nth(1).get_by_role("link").text_content()
            await page.get_by_role("link", name="Next page").click()
            await expect(page).to_have_url(re.compile(r"after="))
            later = await page.get_by_role("row").nth(1).get_by_role("link").text_content()
            # Highest percent first, then by slug: the second page starts where the first left off.
            assert (first, later) == ("EXP_0099", "EXP_1097")
            await check("04-segments-page-2")

            # A refused form keeps what was typed, the problem next to its field.
            await page.goto("/ui/segments")
            await page.get_by_label("Slug").fill("-bad slug")
            await page.evaluate("document.getElementById('slug').removeAttribute('pattern')")  # the server's check
            await page.get_by_label("Percent of all users, automatically").fill("12.5")
            await page.get_by_label("Description (optional)").fill("typed once")
            await page.get_by_role("button", name="Create").click()
            await expect(page.locator("#slug-error")).to_contain_text("must begin with a letter or a digit")
            await expect(page.get_by_label("Slug")).to_have_value("-bad slug")
            await expect(page.get_by_label("Percent of all users, automatically")).to_have_value("12.5")
            await expect(page.get_by_label("Description (optional)")).to_have_value("typed once")
            await expect(page.get_by_label("Slug")).to_have_attribute("aria-invalid", "true")
            await check("05-form-refused")

            # A segment's chart: the SVG's numbers are the history's.
            await page.goto("/ui/segments/VOICE")
            chart = page.get_by_role("img", name=re.compile("VOICE: entries, exits and members per day"))
            await expect(chart).to_be_visible()
            drawn = await page.eval_on_selector_all("svg.chart g.day", """groups => groups.map(g => [
                g.dataset.day, +g.dataset.entries, +g.dataset.exits, +g.dataset.members])""")
            assert drawn == await daily_history(stack.settings.database_url, "VOICE")
            await page.screenshot(path=shots / "readme-segment.png")  # the top of the page, for the docs
            await page.get_by_text("The numbers, day by day").click()
            await expect(page.get_by_role("table", name="VOICE, 30 days")).to_be_visible()
            await check("06-segment")
            await page.goto("/ui/segments/VOICE/delete")
            await check("07-segment-delete")

            # A user's change: the outcome in place, on the user's page.
            await page.goto("/ui/users/1000")
            await page.get_by_label("Segments to add").fill("EXP_0007")
            await page.get_by_role("button", name="Apply the changes").click()
            await expect(page.get_by_role("status")).to_contain_text("applied for user 1000")
            await expect(page.get_by_role("table", name="Segments now")).to_contain_text("EXP_0007")
            await check("08-user-changed")

            # Activity: filtered to the rejected commands, each linked to what it was about.
            await page.get_by_role("navigation", name="Sections").get_by_role("link", name="Activity").click()
            await page.get_by_label("Status").select_option("rejected")
            await page.get_by_role("button", name="Filter").click()
            rejected = page.get_by_role("table").get_by_role("row")
            await expect(rejected).to_have_count(2)
            await expect(rejected.nth(1)).to_contain_text("refused")
            await expect(rejected.nth(1).get_by_role("link", name="user 1000")).to_be_visible()
            # A click that submits a form returns once the next page starts loading: each step waits
            # for that page's content before it looks, or the screenshot meets a page being replaced.
            await page.get_by_label("Status").select_option("")
            await page.get_by_role("button", name="Filter").click()
            await expect(page).to_have_url(re.compile(r"status=(&|$)"))
            await expect(rejected).to_have_count(5)  # the header, the three commands and the console's own
            await page.wait_for_load_state()
            await page.screenshot(path=shots / "readme-activity.png")
            await page.get_by_label("Status").select_option("rejected")
            await page.get_by_role("button", name="Filter").click()
            await expect(page).to_have_url(re.compile(r"status=rejected"))
            await expect(rejected).to_have_count(2)
            await page.wait_for_load_state()
            await check("09-activity")

            await page.goto("/ui/commands")
            await check("10-find-command")
            await page.goto("/ui/commands/refused")
            await expect(page.get_by_role("status")).to_contain_text("rejected for user 1000")
            await expect(page.get_by_role("link", name="RETIRED")).to_be_visible()
            await check("11-command-rejected")
            await page.goto("/ui/commands/nobody-sent-this")
            await expect(page.get_by_text("has an outcome yet")).to_be_visible()
            await check("12-command-unknown")
            await page.goto("/ui/users")
            await check("13-find-user")
            await page.goto("/ui/import")
            await check("14-import")
            await context.close()
        finally:
            await browser.close()
    assert problems == {}, problems
