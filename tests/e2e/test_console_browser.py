"""The web console in headless Chromium, against the services as processes: sign in, create a
segment at 30 %, add a user with a TTL, see the user's segments, download the month's CSV, import
1,000 rows, look up a rejected command. One screenshot of each page is kept (tests/browser.py)."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from tests.browser import BROWSER_MISSING, CHECKOUT, FLAGS, artifacts_dir
from tests.e2e.conftest import TRACE_URL
from tests.support import Publisher

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def import_file(path) -> None:
    """1,000 rows: 990 valid, 5 naming a segment that does not exist (rejected by the consumer),
    5 with a user id that is not one (invalid, refused before publishing)."""
    lines = ["user_id,segment_slug,action,ttl"]
    lines += [f"{2000 + n},AVITO_DISCOUNT_30,add,{'7d' if n % 2 else ''}" for n in range(990)]
    lines += [f"{3000 + n},NO_SUCH_SEGMENT,add," for n in range(5)]
    lines += [f"user-{n},AVITO_DISCOUNT_30,add," for n in range(5)]
    path.write_text("\n".join(lines) + "\n")


async def every_control_has_a_label(page) -> None:
    unlabelled = await page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => el.type !== 'hidden')
        .filter(el => el.tagName === 'BUTTON' ? !el.textContent.trim() : el.labels.length === 0)
        .map(el => el.outerHTML)""")
    assert unlabelled == [], unlabelled


async def test_the_console_from_sign_in_to_import(chromium, console_stack, tmp_path):
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=30_000)  # outcomes arrive within a second; a loaded CI machine may be slower
    shots = artifacts_dir("console")
    stack = console_stack

    async def shot(page, name: str) -> None:
        await every_control_has_a_label(page)
        await page.screenshot(path=shots / f"{name}.png", full_page=True)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            context = await browser.new_context(base_url=stack.api_url(), accept_downloads=True,
                                                viewport={"width": 1200, "height": 800})
            page = await context.new_page()
            nav = page.get_by_role("navigation", name="Sections")

            # 1. Sign in, with the keyboard alone: the key field has the focus, Enter sends the form.
            await page.goto("/ui/")
            await expect(page).to_have_url(re.compile(r"/ui/signin\?next="))
            await shot(page, "01-sign-in")
            await page.keyboard.type(stack.api_key)
            await page.keyboard.press("Enter")
            await expect(page.get_by_role("heading", name="Segments", exact=True)).to_be_visible()
            await expect(page.get_by_text("Signed in as support")).to_be_visible()
            await page.keyboard.press("Tab")  # the first stop skips to the content
            assert await page.evaluate("document.activeElement.textContent") == "Skip to the content"

            # 2. Create a segment at 30 %; the outcome appears when the consumer has applied it.
            await page.get_by_label("Slug").fill("AVITO_DISCOUNT_30")
            await page.get_by_label("Percent of all users, automatically").fill("30")
            await page.get_by_label("Description (optional)").fill("30 % off for a third of users")
            await page.get_by_role("button", name="Create").click()
            await expect(page.get_by_role("status")).to_contain_text("Create segment: applied")
            await expect(page.get_by_role("link", name="Back to segment AVITO_DISCOUNT_30")).to_be_visible()
            await shot(page, "02-command-applied")
            await nav.get_by_role("link", name="Segments").click()
            row = page.get_by_role("row", name=re.compile("AVITO_DISCOUNT_30"))
            await expect(row).to_contain_text("30 %")
            await expect(row).to_contain_text("30 % off for a third of users")
            await shot(page, "03-segments")

            # 3. Add a user with a TTL.
            await nav.get_by_role("link", name="Users").click()
            await page.get_by_label("User id").fill("1000")
            await page.get_by_role("button", name="Show").click()
            await page.get_by_label("Segments to add").fill("AVITO_DISCOUNT_30")
            await page.get_by_label("For how long (optional)").fill("2d")
            added_at = datetime.now(UTC)
            await page.get_by_role("button", name="Apply the changes").click()
            # The outcome in place, on the user's page, which then shows the change.
            await expect(page.get_by_role("status")).to_contain_text("Update user segments: applied for user 1000")
            await expect(page).to_have_url(re.compile(r"/ui/users/1000\?command="))
            await expect(page.locator(".result")).to_contain_text("AVITO_DISCOUNT_30")

            # 4. The user's segments, with source and expiry (in 2 days; the exact moment behind it).
            now = page.get_by_role("table", name="Segments now")
            row = now.get_by_role("row", name=re.compile("AVITO_DISCOUNT_30"))
            await expect(row).to_contain_text("added by hand")
            await expect(row.locator("td").nth(1)).to_have_text(re.compile(r"in (1|2) days?"))
            expires = datetime.fromisoformat((await row.locator("td time").get_attribute("datetime"))
                                             .replace("Z", "+00:00"))
            assert abs(expires - (added_at + timedelta(days=2))) < timedelta(minutes=2)

            # 5. The month's history as a table, and its CSV.
            history = page.get_by_role("table", name=re.compile("Entries and exits"))
            await expect(history.get_by_role("row", name=re.compile("AVITO_DISCOUNT_30 entered"))).to_have_count(1)
            await shot(page, "04-user")
            async with page.expect_download() as waiting:
                await page.get_by_role("link", name=re.compile("Download the CSV")).click()
            download = await waiting.value
            rows = list(csv.DictReader(io.StringIO((await download.path()).read_text())))
            assert [(r["user_id"], r["segment_slug"], r["operation"], r["source"]) for r in rows] == [
                ("1000", "AVITO_DISCOUNT_30", "I", "manual")]
            assert rows[0]["executed_at"].startswith(added_at.strftime("%Y-%m-%d"))

            # 6. Import 1,000 rows: checked first, then published, then counted.
            file = tmp_path / "assignments.csv"
            import_file(file)
            await nav.get_by_role("link", name="Import").click()
            await page.get_by_label("CSV file").set_input_files(file)
            await page.get_by_role("button", name="Check the file").click()
            await expect(page.locator("#check-summary")).to_have_text("995 valid rows, 5 invalid.")
            await expect(page.get_by_role("row", name=re.compile(r"^997 user_id 'user-0'"))).to_be_visible()
            await shot(page, "05-import-checked")
            await page.get_by_role("button", name="Publish 995 rows").click()
            await expect(page.locator("#import-counts")).to_have_text(
                re.compile(r"Done: 990 applied,\s+5 rejected,\s+5 invalid"))
            problems = page.get_by_role("table", name="Rows not applied")
            await expect(problems.get_by_role("row")).to_have_count(6)  # the header and the 5 rejected rows
            await expect(problems).to_contain_text("segment_not_found")
            await shot(page, "06-import-done")

            # 7. Look up a rejected command: its error, and its trace (the producer's traceparent).
            async with Publisher(stack.settings) as publish:
                await publish.user({"type": "update_user_segments", "user_id": 77, "add": ["RETIRED"],
                                    "command_id": "support-ticket-77"},
                                   headers=[("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01".encode())])
            await nav.get_by_role("link", name="Commands").click()
            await page.get_by_label("Command id").fill("support-ticket-77")
            await page.get_by_role("button", name="Look up").click()
            await expect(page.get_by_role("status")).to_contain_text("rejected for user 77")
            await expect(page.get_by_role("alert")).to_contain_text("segment_not_found")
            await expect(page.get_by_role("alert")).to_contain_text("RETIRED")
            link = page.get_by_role("link", name="Open the trace")
            assert await link.get_attribute("href") == TRACE_URL.replace("{trace_id}", TRACE_ID)
            await shot(page, "07-command-rejected")

            # The segments again, with the import's members counted.
            await nav.get_by_role("link", name="Segments").click()
            row = page.get_by_role("row", name=re.compile("AVITO_DISCOUNT_30"))
            await expect(row.get_by_role("cell").nth(2)).to_have_text("991")  # user 1000 and the 990 imported
            await shot(page, "08-segments-after-import")
            await context.close()
        finally:
            await browser.close()


def test_without_chromium_the_browser_test_is_skipped_and_the_run_says_so(tmp_path):
    """A machine without Chromium: the browser test is skipped (before any server starts), and the
    end of the run says so in words, never passing it silently."""
    env = {**os.environ, "CHROMIUM_PATH": str(tmp_path / "no-chromium-here")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
         "tests/e2e/test_console_browser.py::test_the_console_from_sign_in_to_import"],
        cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and "passed" not in run.stdout
    assert f"1 browser test(s) NOT RUN: {BROWSER_MISSING}" in run.stdout
