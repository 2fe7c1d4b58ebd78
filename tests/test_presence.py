"""Presence and per-user stream counts across hubs (myapp.presence): two hubs on one memory broker as two workers."""

import json

import pytest

from myapp.brokers.memory import MemoryBroker
from myapp.exceptions import InvalidEvent
from myapp.hub import TooManyStreams
from myapp.presence import PresenceNotEnabled, presence, tracked
from tests.conftest import wait_until
from tests.sse_client import parse_all


@pytest.fixture
def broker():
    return MemoryBroker()


@pytest.fixture
def two_hubs(broker, hub_factory):
    """Two hubs (two workers) tracking room:* with join/leave events, 3 streams per user."""
    options = {
        "heartbeat_interval": 0.2,
        "presence_channels": ["room:*"],
        "presence_events": True,
        "max_streams_per_owner": 3,
    }
    return hub_factory(broker, **options), hub_factory(broker, **options)


def who(broker, channel):
    counts = broker.presence_read("c:" + channel)
    return {"users": sorted(m for m in counts if m != "-"), "anonymous": counts.get("-", 0)}


def test_patterns_select_the_tracked_channels():
    """Only channels matching a pattern are tracked."""
    assert tracked("room:lobby", ["room:*"]) and not tracked("user:1", ["room:*"])
    assert not tracked("room:lobby", [])


def test_presence_is_the_union_of_every_hub(broker, two_hubs):
    """Users on either hub are present; token streams count as anonymous; leaving removes them."""
    first, second = two_hubs
    alice = first.subscribe(["room:a"], owner=1)
    second.subscribe(["room:a"], owner=2)
    second.subscribe(["room:a"])
    first.subscribe(["room:b"], owner=3)
    wait_until(lambda: who(broker, "room:a") == {"users": ["1", "2"], "anonymous": 1}, what="both hubs' users")
    assert who(broker, "room:b") == {"users": ["3"], "anonymous": 0}
    alice.close()
    wait_until(lambda: who(broker, "room:a") == {"users": ["2"], "anonymous": 1}, what="alice to leave")


def test_a_hub_that_died_stops_counting_within_two_intervals(broker, two_hubs):
    """A hub that stops writing (a crashed worker) no longer counts once its time-to-live passed."""
    first, second = two_hubs
    first.subscribe(["room:a"], owner=1)
    second.subscribe(["room:a"], owner=2)
    wait_until(lambda: who(broker, "room:a")["users"] == ["1", "2"], what="both")
    first._stop.set()  # its threads end, as in a crash: nothing more is written, no goodbye
    wait_until(lambda: who(broker, "room:a")["users"] == ["2"], timeout=2 * 2 * 0.2 + 2, what="the dead hub to vanish")


def test_join_and_leave_events_count_the_user_on_every_hub(broker, two_hubs, hub_factory):
    """presence.join when a user's first stream appears anywhere, presence.leave when the last one goes."""
    first, second = two_hubs
    watcher = first.subscribe(["room:a"])
    one = first.subscribe(["room:a"], owner=7)
    wait_until(lambda: "7" in who(broker, "room:a")["users"], what="user 7")
    two = second.subscribe(["room:a"], owner=7)
    wait_until(lambda: ("c:room:a", "7") in second.presence._written, what="the second hub to write its stream")
    one.close()
    two.close()
    wait_until(lambda: who(broker, "room:a")["users"] == [], what="user 7 gone")
    messages = []

    def announced():
        messages.extend(parse_all(b"".join(watcher.get(0.1)[1])))
        return [m.type for m in messages if m.type.startswith("presence.")] == ["presence.join", "presence.leave"]

    wait_until(announced, what="one join and one leave")
    assert [json.loads(m.data) for m in messages if m.type.startswith("presence.")] == [{"user": "7"}, {"user": "7"}]


def test_streams_per_user_count_across_hubs(broker, two_hubs):
    """MYAPP_MAX_STREAMS_PER_USER counts every hub's streams (3 here: 2 on one hub, 1 on the other)."""
    first, second = two_hubs
    first.subscribe(["room:a"], owner=5)
    first.subscribe(["room:b"], owner=5)
    second.subscribe(["room:c"], owner=5)
    wait_until(lambda: first.presence.remote_streams(5) == 1, what="the other hub's stream to be written")
    with pytest.raises(TooManyStreams):
        first.subscribe(["room:d"], owner=5)
    with pytest.raises(TooManyStreams):
        second.subscribe(["room:d"], owner=5)
    second.subscribe(["room:d"], owner=6)


def test_presence_api_refuses_untracked_and_invalid_channels(settings, memory_broker):
    """presence() answers for tracked channels only, and refuses bad names."""
    settings.MYAPP_PRESENCE_CHANNELS = ["room:*"]
    assert presence("room:empty") == {"users": [], "anonymous": 0}
    with pytest.raises(PresenceNotEnabled):
        presence("user:1")
    with pytest.raises(InvalidEvent):
        presence("bad name")


def test_publishers_cannot_send_presence_events(memory_broker):
    """presence.* event types belong to the hubs."""
    from myapp.publish import send_event

    with pytest.raises(InvalidEvent, match="reserved for presence"):
        send_event("room:a", "presence.join", {"user": "1"})
