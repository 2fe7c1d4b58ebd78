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


AWKWARD = {
    "CR": "a\rb",
    "LF": "a\nb",
    "CRLF": "a\r\nb",
    "lone CR at end": "ends with CR\r",
    "empty": "",
    "leading space": " leading space",
    "emoji": "rocket \U0001f680 and é",
    "64 KiB": "k" * 65536,
}


def normalised(data):
    """WHATWG HTML 9.2.6: every CRLF or CR in data reaches the page as LF."""
    return data.replace("\r\n", "\n").replace("\r", "\n")


def test_event_source_hands_the_page_exactly_what_was_sent(page, redis_stack):
    """Awkward payloads arrive as sent: raw text with line breaks normalised per spec, JSON exactly."""
    import uuid

    log_in(page, redis_stack)
    channel = f"room:conformance-{uuid.uuid4().hex[:8]}"
    page.evaluate(
        """channel => new Promise(resolve => {
            window.got = [];
            const source = new EventSource("/events/?channel=" + channel);
            source.addEventListener("raw", e => window.got.push(["raw", e.data]));
            source.addEventListener("json", e => window.got.push(["json", JSON.parse(e.data)]));
            source.addEventListener("stream.open", () => resolve());
        })""",
        channel,
    )
    for value in AWKWARD.values():
        assert redis_stack.publish(channel, value, event_type="raw", raw=True).status_code == 200
        assert redis_stack.publish(channel, value, event_type="json").status_code == 200
    page.wait_for_function("count => window.got.length >= count", arg=2 * len(AWKWARD), timeout=15000)
    got = page.evaluate("window.got")
    expected = [item for value in AWKWARD.values() for item in (["raw", normalised(value)], ["json", value])]
    assert got == expected


def start_job(stack, session, rows):
    source = "\n".join(f"Watch {n},watch-{rows}-{n}@example.com" for n in range(rows))
    response = session.post(
        stack.url + "/jobs/", data={"source": source}, headers={"X-CSRFToken": session.cookies["csrftoken"]}
    )
    assert response.status_code == 201
    return response.json()["id"]


def test_job_page_stops_listening_after_the_job_finishes(page, redis_stack):
    """The job page's stream ends for good on stream.close: no reconnection follows."""
    log_in(page, redis_stack)
    requests_made = []
    page.on("request", lambda request: "/events/" in request.url and requests_made.append(request.url))
    job_id = start_job(redis_stack, redis_stack.login("carol"), rows=30)
    page.goto(f"{redis_stack.url}/jobs/{job_id}/watch/")
    page.wait_for_selector('#connection[data-state="closed"]', timeout=30000)
    assert page.inner_text("#job-status") in ("finished", "queued", "running")
    page.wait_for_timeout(1500)  # an observation window: a reconnect would come after 300-600 ms
    streams = [url for url in requests_made if "check=1" not in url]
    assert len(streams) == 1, f"no reconnection after stream.close: {requests_made}"
    page.reload()
    page.wait_for_selector('#connection[data-state="closed"]')
    assert page.inner_text("#job-status") == "finished"


def test_finished_job_channel_answers_204(redis_stack):
    """A stream for a channel that has ended for good gets 204 (the browser stops)."""
    session = redis_stack.login("carol")
    job_id = start_job(redis_stack, session, rows=1)
    from tests.conftest import wait_until

    wait_until(lambda: session.get(f"{redis_stack.url}/jobs/{job_id}/").json()["status"] == "finished", timeout=30)
    response = session.get(f"{redis_stack.url}/events/?channel=job:{job_id}", timeout=10)
    assert response.status_code == 204


def test_page_script_retries_after_event_source_gives_up_and_resumes(browser, tmp_path):
    """503s stop a native EventSource; push.js retries with jitter, shows the state, and loses nothing."""
    import signal

    from scripts.servers import EmbeddedValkey
    from tests.stack import LiveStack

    # Persistent, as a production Redis: the restart keeps the history to resume from.
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=True).start()
    try:
        with LiveStack(tmp_path / "stack", mode="redis", redis_url=valkey.url, workers=1) as stack:
            context = browser.new_context()
            page = context.new_page()
            log_in(page, stack)
            checks = []
            page.on("request", lambda request: "check=1" in request.url and checks.append(request.url))
            page.evaluate(
                """() => new Promise(resolve => {
                    window.states = [];
                    window.got = [];
                    window.probe = new PushStream("/events/?channel=room:retry", {
                        onstate: state => { window.states.push(state); if (state === "live") resolve(); },
                        retryMs: 300
                    });
                    window.probe.on("note", data => window.got.push(data));
                })"""
            )
            assert stack.publish("room:retry", "before").status_code == 200
            page.wait_for_function("window.got.length === 1")

            valkey.stop()
            stack.gunicorn.send_signal(signal.SIGHUP)  # a deploy: new workers start while the broker is down
            # The stream ends, EventSource reconnects, gets 503 and gives up; push.js takes over.
            page.wait_for_function("window.probe._attempt >= 2", timeout=20000)
            assert page.evaluate("window.states.slice(-1)[0]") == "reconnecting"

            valkey.start()
            from tests.conftest import wait_until

            wait_until(
                lambda: stack.publish("room:retry", "after").status_code == 200, timeout=20, what="publishing again"
            )
            page.wait_for_function("window.got.length === 2", timeout=30000)
            assert page.evaluate("window.got") == ["before", "after"]
            assert page.evaluate("window.states.slice(-1)[0]") == "live"
            assert page.evaluate("window.probe.source.readyState") == 1
            assert checks, "the EventSource gave up and push.js asked ?check=1 before retrying"
            assert "lastEventId=" in page.evaluate("window.probe.source.url"), "the retry resumed from the last id"
            context.close()
    finally:
        valkey.stop()


#: Seconds push.js is watched after it closed: a retry would come within the
#: first backoff step (150-300 ms with retryMs 300), an EventSource reconnect
#: within the stack's 300-600 ms retry.
QUIET_SECONDS = 3


def probe(page, url):
    """Open ``new PushStream(url)`` on the page as window.probe; record its states and its requests."""
    page.probe_requests = []
    page.on("request", lambda request: url in request.url and page.probe_requests.append(request.url))
    page.evaluate(
        """url => {
            window.states = [];
            window.probe = new PushStream(url, {onstate: state => window.states.push(state), retryMs: 300});
        }""",
        url,
    )


@pytest.mark.parametrize("status", [204, 401, 403])
def test_page_script_stops_for_good_on_204_401_403(page, redis_stack, status):
    """On 204, 401 and 403 push.js closes (state "closed") and sends no further request to /events/."""
    import uuid

    from tests.conftest import wait_until

    log_in(page, redis_stack)
    if status == 204:
        # The demo's authorizer answers GONE for a finished job: 204.
        session = redis_stack.login("carol")
        job_id = start_job(redis_stack, session, rows=1)
        job = f"{redis_stack.url}/jobs/{job_id}/"
        wait_until(lambda: session.get(job).json()["status"] == "finished", timeout=30, what="the job to finish")
        url = f"/events/?channel=job:{job_id}"
    elif status == 401:
        page.context.clear_cookies()  # the session is gone (logged out elsewhere)
        url = f"/events/?channel=room:anonymous-{uuid.uuid4().hex[:8]}"
    else:
        url = "/events/?channel=team:secret"  # the demo's authorizer refuses team: channels
    probe(page, url)
    page.wait_for_function("window.probe.state === 'closed'", timeout=15000)
    assert page.evaluate("window.probe.failure") == status
    assert page.evaluate("window.states") == ["connecting", "reconnecting", "closed"]
    sent = list(page.probe_requests)
    assert any("check=1" in request for request in sent), "push.js asked ?check=1 once EventSource gave up"
    page.wait_for_timeout(QUIET_SECONDS * 1000)  # an observation window: nothing may follow
    assert page.probe_requests == sent, f"no request after closing on {status}: {page.probe_requests}"
    assert page.evaluate("window.probe.state") == "closed"


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory):
    """A one-worker stack on a Valkey server of its own, which a test may stop: (stack, valkey)."""
    from scripts.servers import EmbeddedValkey
    from tests.stack import LiveStack

    valkey = EmbeddedValkey(tmp_path_factory.mktemp("outage-valkey")).start()
    try:
        with LiveStack(tmp_path_factory.mktemp("outage-stack"), mode="redis", redis_url=valkey.url, workers=1) as stack:
            yield stack, valkey
    finally:
        valkey.stop()


def test_page_script_keeps_retrying_on_503(page, outage_stack):
    """While /events/ answers 503 push.js keeps retrying with backoff (never "closed"), and goes live once it can."""
    import uuid

    from tests.conftest import wait_until

    stack, valkey = outage_stack
    wait_until(lambda: stack.publish("room:warm-up", "x").status_code == 200, timeout=20, what="the broker")
    log_in(page, stack)
    channel = f"room:outage-{uuid.uuid4().hex[:8]}"
    valkey.stop()
    try:
        probe(page, f"/events/?channel={channel}")
        page.wait_for_function("window.probe._attempt >= 4", timeout=20000)
        streams = [url for url in page.probe_requests if "check=1" not in url]
        checks = [url for url in page.probe_requests if "check=1" in url]
        assert len(streams) >= 4 and len(checks) >= 4, page.probe_requests
        assert "closed" not in page.evaluate("window.states")
        assert page.evaluate("window.probe.state") == "reconnecting"
    finally:
        valkey.start()
    page.wait_for_function("window.probe.state === 'live'", timeout=30000)
    assert "closed" not in page.evaluate("window.states")
