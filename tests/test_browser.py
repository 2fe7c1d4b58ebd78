"""The page in headless Chromium (Playwright, Debian's /usr/bin/chromium): native EventSource and the polyfill."""

import os
import shutil

import pytest

from tests.stack import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def csv_for(page):
    """Six contacts no other test imports (so none are skipped as duplicates)."""
    return "\n".join(f"Browser {n},{page.transport}-{n}@example.com" for n in range(1, 7))


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(params=["native", "polyfill"])
def page(request, browser):
    """A logged-in page; with "polyfill", window.EventSource is removed before any page script runs."""
    context = browser.new_context()
    if request.param == "polyfill":
        context.add_init_script("delete window.EventSource;")
    page = context.new_page()
    page.transport = request.param
    yield page
    context.close()


def log_in(page, stack, user="carol"):
    page.goto(stack.url + "/")
    page.fill("#id_username", user)
    page.fill("#id_password", PASSWORD)
    page.click("#login")
    page.wait_for_selector('#connection[data-state="live"]', timeout=15000)


def test_progress_bar_reaches_100_and_notification_shows(page, redis_stack):
    """Log in, start an import, see the bar reach 100% and the finished notification."""
    log_in(page, redis_stack)
    assert page.get_attribute("#page", "data-transport") == page.transport
    page.fill("#source", csv_for(page))
    page.click("#start")
    notice = page.wait_for_selector(".notice-success", timeout=30000)
    assert "finished: 6 imported, 0 skipped" in notice.inner_text()
    row = page.locator(".job").first
    assert row.locator("progress").evaluate("bar => bar.value") == 100
    assert row.locator(".job-status").inner_text() == "finished"


def test_failed_import_shows_the_error(page, redis_stack):
    """A bad row ends the import with a failure notification naming the row."""
    log_in(page, redis_stack)
    page.fill("#source", "Good,good@example.com\nBad,bad-address")
    page.click("#start")
    notice = page.wait_for_selector(".notice-error", timeout=30000)
    assert "failed: row 2: 'bad-address' is not a valid email address" in notice.inner_text()
