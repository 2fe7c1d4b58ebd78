"""Clients other than browsers read the stream correctly (httpx-sse against the real stack)."""

import httpx
import pytest
from httpx_sse import connect_sse

from myapp.ids import parse

pytestmark = pytest.mark.e2e


def test_httpx_sse_sees_heartbeat_positions_as_named_events_it_can_ignore(redis_stack):
    """Heartbeats that move the last event id reach httpx-sse as `stream.position` (no data), never as `message`."""
    session = redis_stack.login("bob")
    cookies = dict(session.cookies.items())
    other = redis_stack.login("carol")
    seen = []
    with (
        httpx.Client(base_url=redis_stack.url, cookies=cookies, timeout=10) as client,
        connect_sse(client, "GET", "/events/") as source,
    ):
        assert source.response.status_code == 200
        for event in source.iter_sse():
            seen.append(event)
            if event.event == "stream.open":
                # Another channel moves the hub's position; bob's quiet stream hears it by heartbeat.
                (channel,) = other.get(redis_stack.url + "/events/?check=1", timeout=5).json()["channels"]
                moved_to = redis_stack.publish(channel, "elsewhere").json()["id"]
            if event.event == "stream.position" and parse(event.id) >= parse(moved_to):
                break
    kinds = [event.event for event in seen]
    assert "message" not in kinds, "no empty message events"
    assert seen[0].event == "stream.open" and seen[0].retry is not None, "the retry travels in the first event"
    positions = [event for event in seen if event.event == "stream.position"]
    assert positions and all(event.data == "" for event in positions)
    assert parse(positions[-1].id) >= parse(moved_to), "the position keeps the resume id moving"
