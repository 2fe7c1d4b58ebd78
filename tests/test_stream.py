"""One stream (myapp.stream) over the memory broker: start, resume, resets, endings."""

import json

import pytest

from myapp.brokers.memory import MemoryBroker
from myapp.ids import SEQ_BITS, format_id, parse
from myapp.stream import open_stream
from tests.conftest import wait_until
from tests.sse_client import SSEParser


class Reader:
    """Pulls frames from a stream and parses them."""

    def __init__(self, stream):
        self.stream = stream
        self.frames = iter(stream)
        self.parser = SSEParser()
        self.messages = []
        self.ended = False

    def pull(self):
        try:
            frame = next(self.frames)
        except StopIteration:
            self.ended = True
            return []
        messages = self.parser.feed(frame)
        self.messages.extend(messages)
        return messages

    def until(self, predicate, what="messages", limit=200):
        for _ in range(limit):
            if predicate(self.messages) or self.ended:
                break
            self.pull()
        assert predicate(self.messages), f"never got {what}: {self.messages}"
        return self.messages

    def data(self, event_type="t"):
        return [m.data for m in self.messages if m.type == event_type]


@pytest.fixture
def broker():
    return MemoryBroker(history_length=5, history_ttl=60)


@pytest.fixture
def hub(broker, hub_factory):
    return hub_factory(broker, heartbeat_interval=0.05)


def test_fresh_stream_starts_with_open_event_at_the_newest_position(broker, hub):
    """A fresh stream sends stream.open whose id is the broker's newest position, then only newer events."""
    old = broker.publish("room:a", "t", "old")
    reader = Reader(open_stream(hub, ("room:a",)))
    (opened,) = reader.pull()
    assert (opened.type, parse(opened.last_event_id)) == ("stream.open", old)
    assert json.loads(opened.data) == {"channels": ["room:a"], "resumed": False}
    broker.publish("room:a", "t", "new")
    reader.until(lambda ms: reader.data() == ["new"])


def test_resume_replays_missed_events_then_goes_live_without_duplicates(broker, hub):
    """Last-Event-ID replays exactly what came after it, in order, then live events; nothing twice."""
    seen = broker.publish("room:a", "t", "seen")
    for n in range(3):
        broker.publish("room:a", "t", f"missed {n}")
    reader = Reader(open_stream(hub, ("room:a",), format_id(seen)))
    reader.until(lambda ms: len(reader.data()) == 3)
    assert json.loads(reader.messages[0].data)["resumed"] is True
    broker.publish("room:a", "t", "live")
    reader.until(lambda ms: "live" in reader.data())
    assert reader.data() == ["missed 0", "missed 1", "missed 2", "live"]


@pytest.mark.parametrize(
    ("last_event_id", "reason"),
    [("garbage", "malformed"), ("1-2-3", "malformed"), ("٣-0", "malformed"), ("9" * 15 + "-0", "unknown")],
    ids=["garbage", "extra dash", "non-ASCII digits", "from the future"],
)
def test_unusable_last_event_id_resets(broker, hub, last_event_id, reason):
    """A Last-Event-ID that cannot be resumed gets stream.reset (never a 400), then live events."""
    before = broker.publish("room:a", "t", "before")
    reader = Reader(open_stream(hub, ("room:a",), last_event_id))
    (reset,) = reader.pull()
    assert (reset.type, json.loads(reset.data)) == ("stream.reset", {"reason": reason})
    assert before <= parse(reset.last_event_id) <= broker.last_position(), "it starts at the newest position"
    broker.publish("room:a", "t", "after")
    reader.until(lambda ms: reader.data() == ["after"])


def test_trimmed_history_resets(broker, hub):
    """If events after the Last-Event-ID were trimmed, the stream resets instead of skipping them."""
    first = broker.publish("room:a", "t", "0")
    for n in range(1, 8):
        broker.publish("room:a", "t", str(n))
    reader = Reader(open_stream(hub, ("room:a",), format_id(first)))
    (reset,) = reader.pull()
    assert json.loads(reset.data) == {"reason": "trimmed"}


def test_id_older_than_history_ttl_resets(broker, hub):
    """A Last-Event-ID older than history_ttl resets, even if nothing was trimmed."""
    pos = broker.publish("room:a", "t", "x")
    old = pos - (61_000 << SEQ_BITS)
    reader = Reader(open_stream(hub, ("room:a",), format_id(old)))
    assert json.loads(reader.pull()[0].data) == {"reason": "expired"}


def test_heartbeats_move_the_last_event_id_forward(broker, hub):
    """On a quiet channel, heartbeats carry data-less stream.position blocks so the client's last event id keeps up."""
    reader = Reader(open_stream(hub, ("room:a",)))
    reader.pull()
    before = reader.parser.last_event_id
    hub.subscribe(["room:busy"])
    busy = broker.publish("room:busy", "t", "elsewhere")
    wait_until(lambda: reader.pull() is not None and parse(reader.parser.last_event_id) >= busy, what="a heartbeat id")
    assert parse(reader.parser.last_event_id) > parse(before)
    assert reader.data() == [], "heartbeats dispatch nothing"
    assert [m.type for m in reader.messages] == ["stream.open"], "a block without data is not dispatched"


def test_overflowing_stream_ends_cleanly_with_a_retry(broker, hub_factory):
    """A stream that falls too far behind ends between frames, with a retry, so the browser resumes."""
    slow_hub = hub_factory(broker, queue_size=2, heartbeat_interval=10)
    reader = Reader(open_stream(slow_hub, ("room:a",)))
    reader.pull()
    for n in range(4):
        broker.publish("room:a", "t", str(n))
    wait_until(lambda: slow_hub.stats()["streams"] == 0, what="the overflow")
    while not reader.ended:
        reader.pull()
    assert reader.data() == ["0", "1"]
    assert reader.parser.comments[-1] == "closing: overflow"
    assert reader.parser.retry is not None
    reader2 = Reader(open_stream(slow_hub, ("room:a",), reader.parser.last_event_id))
    reader2.until(lambda ms: len(reader2.data()) == 2)
    assert reader2.data() == ["2", "3"], "the reconnect resumes from history"


def test_stream_ends_when_the_hub_stops(broker, hub):
    """A stream whose hub stopped (worker shutdown, hub crash) ends instead of going silent."""
    reader = Reader(open_stream(hub, ("room:a",)))
    reader.pull()
    hub.stop("shutdown")
    while not reader.ended:
        reader.pull()
    assert reader.parser.comments[-1] == "closing: shutdown"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_hub_thread_death_closes_its_streams(broker, hub, monkeypatch):
    """If the hub's listener thread dies, every stream closes and a new hub is used next time."""
    reader = Reader(open_stream(hub, ("room:a",)))
    reader.pull()

    def die(*args):
        raise SystemExit("the listener thread is gone")

    monkeypatch.setattr(hub.link, "_serve", die)
    hub.link._listener.close()  # the loop reconnects, then _serve dies
    while not reader.ended:
        reader.pull()
    assert reader.parser.comments[-1] == "closing: hub stopped"
    assert hub.stopped
    hub._threads[0].join(5)


def test_stream_lifetime_ends_the_stream(broker, hub):
    """After its lifetime a stream ends (the browser reconnects and is authorized again), counted as such."""
    reader = Reader(open_stream(hub, ("room:a",), lifetime=0.1))
    while not reader.ended:
        reader.pull()
    assert reader.parser.comments[-1] == "closing: lifetime"
    assert hub.counters.closes == {"lifetime": 1}, "not 'unsubscribed': the metrics tell lifetimes apart"


def test_first_frame_leaves_at_once_even_with_nothing_queued(broker, hub_factory, monkeypatch):
    """The first frame (and so the response headers) does not wait for an event or a heartbeat."""
    import threading

    from myapp.hub import Hub

    monkeypatch.setattr(Hub, "_heartbeats", lambda self: None)  # no heartbeat will come
    quiet_hub = hub_factory(broker)
    quiet_hub.subscribe(["room:a"])  # the channel is held: the new stream takes the fast path
    frames = iter(open_stream(quiet_hub, ("room:a",)))
    got = []
    reader = threading.Thread(target=lambda: got.append(next(frames)), daemon=True)
    reader.start()
    reader.join(2)
    assert got and b"event: stream.open" in got[0], "the first frame came at once"


def test_request_state_is_released_once_the_response_has_started(broker, hub, rf):
    """After the first frame, the request keeps only environ, path and method (no session, user, messages)."""
    request = rf.get("/events/?channel=room:a")
    request.session, request.user, request._messages = object(), object(), object()
    stream = open_stream(hub, ("room:a",))
    stream.attach(None, request=request)
    frames = iter(stream)
    next(frames)
    assert "user" in request.__dict__, "middleware may still use it until the response starts"
    broker.publish("room:a", "t", "x")
    assert b"data: x" in next(frames)
    assert set(request.__dict__) <= {"environ", "META", "path", "path_info", "method"}
    assert request.path == "/events/" and request.META["QUERY_STRING"] == "channel=room:a"
    stream.close()
