"""Broker faults on the real stack: restart the broker server under open streams.

Each test runs its own Valkey or PostgreSQL server, so restarting it disturbs no other test.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from scripts.servers import EmbeddedPostgres, EmbeddedValkey
from tests.conftest import wait_until
from tests.sse_client import SSEClient
from tests.stack import LiveStack

pytestmark = pytest.mark.e2e

#: Publishes and new streams tried, each, while the broker server is down.
OUTAGE_REQUESTS = 5
#: Seconds each of them may take to answer 503 (PostgreSQL: the pool's 5 s
#: DATABASE_POOL_TIMEOUT plus slack for a loaded machine).
OUTAGE_BOUND = 8


class Outage:
    """A live stack with one worker on a private broker server that the test can restart."""

    def __init__(self, stack, server):
        self.stack = stack
        self.server = server

    def publish(self, channel, data):
        return self.stack.publish(channel, data)

    def timed_publish(self, channel, data):
        """The publish API's response, and how long it took to answer (seconds)."""
        started = time.monotonic()
        response = self.stack.publish(channel, data)
        return response, time.monotonic() - started

    def open_stream(self, session):
        client = SSEClient(session, self.stack.url + "/events/")
        assert client.status == 200
        (opened,) = client.wait_count("stream.open", 1)
        return client, json.loads(opened.data)["channels"][0]

    def stream_status(self, session):
        """The status of a new /events/ request, and how long it took to answer (seconds)."""
        started = time.monotonic()
        response = session.get(self.stack.url + "/events/", stream=True, timeout=15)
        response.close()
        return response.status_code, time.monotonic() - started, response.headers


@contextmanager
def _outage(kind, tmp_path):
    """A live stack with one worker on its own broker server, stopped at the end."""
    if kind == "redis":
        # With persistence, as a production Redis runs: a restart keeps the history.
        server = EmbeddedValkey(tmp_path / "valkey", persist=True).start()
        stack = LiveStack(tmp_path / "stack", mode="redis", redis_url=server.url, workers=1)
    else:
        server = EmbeddedPostgres(tmp_path / "postgres").start()
        stack = LiveStack(tmp_path / "stack", mode="postgres", postgres=server, workers=1)
    try:
        with stack:
            yield Outage(stack, server)
    finally:
        server.stop()


@pytest.fixture(params=["redis", "postgres"])
def outage(request, tmp_path):
    with _outage(request.param, tmp_path) as outage:
        yield outage


def test_broker_restart_is_survived_by_open_streams(outage):
    """During the outage each publish and new stream gets a 503 within a bound; after it, old streams get new events."""
    session = outage.stack.login("alice")
    client, channel = outage.open_stream(session)
    assert outage.publish(channel, "before").status_code == 200
    client.wait_for(lambda ms: any(m.data == '"before"' for m in ms), what="the event before the outage")

    outage.server.stop()
    # Every request during the outage answers within a bound, not only the
    # first (which may still find a pooled connection to fail on at once).
    # Each round sends a publish and a new stream together, so the rounds
    # cost one pool timeout each, not two.
    slowest = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for attempt in range(OUTAGE_REQUESTS):
            publishing = pool.submit(outage.timed_publish, channel, f"during-{attempt}")
            status, took, headers = outage.stream_status(session)
            assert status == 503, f"new stream #{attempt + 1} during the outage is refused, not hung"
            assert took < OUTAGE_BOUND, f"new stream #{attempt + 1} during the outage took {took:.1f} s"
            assert headers["Retry-After"] == "5"
            failed, published_in = publishing.result()
            assert failed.status_code == 503 and failed.headers["Retry-After"] == "5"
            assert published_in < OUTAGE_BOUND, f"publish #{attempt + 1} during the outage took {published_in:.1f} s"
            slowest = max(slowest, took, published_in)
    print(f"slowest 503 during the outage: {slowest:.2f} s")

    outage.server.start()
    recovered_at = time.monotonic()
    wait_until(lambda: outage.stream_status(session)[0] == 200, timeout=20, interval=0.1, what="recovery")
    recovery = time.monotonic() - recovered_at
    assert outage.publish(channel, "after").status_code == 200
    client.wait_for(lambda ms: any(m.data == '"after"' for m in ms), timeout=15, what="the event after recovery")
    assert client.ended.is_set() is False, "the old stream stayed open"
    assert [m.data for m in client.messages if m.type == "note"] == ['"before"', '"after"']
    print(f"recovery after restart: {recovery:.2f} s")

    log = outage.stack.tail(20000)
    assert len(re.findall(r"hub: broker connection lost", log)) == 1, "the drop is logged once"
    assert len(re.findall(r"hub: broker connection recovered", log)) == 1, "the recovery is logged once"


def test_resume_across_a_broker_restart(outage):
    """A client away while the broker restarts resumes with what it missed before and after the restart."""
    session = outage.stack.login("alice")
    first, channel = outage.open_stream(session)
    for value in ("a", "b"):
        assert outage.publish(channel, value).status_code == 200
    first.wait_count("note", 2)
    first.close()
    assert outage.publish(channel, "x").status_code == 200, "published while the client is away"

    outage.server.stop()
    outage.server.start()
    wait_until(lambda: outage.stream_status(session)[0] == 200, timeout=20, interval=0.1, what="recovery")
    for value in ("c", "d", "e"):
        assert outage.publish(channel, value).status_code == 200

    second = SSEClient(session, outage.stack.url + "/events/", last_event_id=first.last_event_id)
    try:
        second.wait_count("note", 4)
        assert [m.data for m in second.messages if m.type != "stream.open"] == ['"x"', '"c"', '"d"', '"e"']
    finally:
        second.close()


@pytest.fixture
def forgetful(tmp_path):
    """A live stack on a Valkey server whose data the test can lose (restart without its data)."""
    with _outage("redis", tmp_path) as outage:
        yield outage


def test_broker_that_lost_its_data_resets_resuming_clients(forgetful):
    """After a restart that lost the history, every stream hears stream.reset: open ones at once, resuming ones too."""
    session = forgetful.stack.login("alice")
    live, channel = forgetful.open_stream(session)
    away, _ = forgetful.open_stream(session)
    assert forgetful.publish(channel, "a").status_code == 200
    away.wait_count("note", 1)
    away.close()
    assert forgetful.publish(channel, "lost").status_code == 200, "published while one client is away"
    live.wait_count("note", 2)

    forgetful.server.stop()
    forgetful.server.forget()
    forgetful.server.start()
    wait_until(lambda: forgetful.stream_status(session)[0] == 200, timeout=20, interval=0.1, what="recovery")
    assert forgetful.publish(channel, "after").status_code == 200
    live.wait_count("note", 3)
    sequence = [(m.type, m.data) for m in live.messages if m.type != "stream.open"]
    assert sequence == [
        ("note", '"a"'),
        ("note", '"lost"'),
        ("stream.reset", '{"reason": "trimmed"}'),
        ("note", '"after"'),
    ], "the server cannot tell what it lost while the hub was away: the open stream resets, then goes on live"
    assert not live.ended.is_set(), "the open stream stayed open"

    again = SSEClient(session, forgetful.stack.url + "/events/", last_event_id=away.last_event_id)
    try:
        (reset,) = again.wait_count("stream.reset", 1)
        assert json.loads(reset.data) == {"reason": "trimmed"}, "the events it missed are gone: reload"
        assert forgetful.publish(channel, "next").status_code == 200
        again.wait_count("note", 1)
        assert [m.data for m in again.messages if m.type == "note"] == ['"next"']
    finally:
        again.close()
    assert "(the broker lost its data)" in forgetful.stack.tail(20000)
