"""The hub: reference counting, cleanup, bounded queues, heartbeats, reconnection (memory broker)."""

import json
import threading

import pytest

from myapp.brokers.memory import MemoryBroker, MemoryListener
from myapp.exceptions import BrokerUnavailable
from myapp.hub import OVERFLOW, SHUTDOWN, TooManyStreams
from myapp.ids import format_id, parse
from tests.conftest import wait_until
from tests.sse_client import SSEParser, parse_all


class SpyBroker(MemoryBroker):
    """A memory broker whose listeners record every subscribe and unsubscribe, and can be cut."""

    def __init__(self, **options):
        super().__init__(**options)
        self.commands = []
        self.listeners = []
        self.refuse = threading.Event()

    def listener(self, hub_channel):
        if self.refuse.is_set():
            raise BrokerUnavailable("refused by the test")
        listener = SpyListener(self, hub_channel)
        self.listeners.append(listener)
        return listener

    def data_commands(self):
        """The commands for stream channels (the hub's own and the control channel left out)."""
        commands = [(verb, [c for c in channels if not c.startswith("!")]) for verb, channels in self.commands]
        return [(verb, channels) for verb, channels in commands if channels]


class SpyListener(MemoryListener):
    def subscribe(self, channels):
        self._broker.commands.append(("subscribe", sorted(channels)))
        super().subscribe(channels)

    def unsubscribe(self, channels):
        self._broker.commands.append(("unsubscribe", sorted(channels)))
        super().unsubscribe(channels)

    def cut(self):
        """Simulate a dropped connection: the next wait raises."""
        self.close()


def frames_of(subscription, timeout=5.0):
    """Collect the frames (bytes) a subscription queues until ``timeout`` passes with nothing new."""
    collected = []
    while True:
        _, frames = subscription.get(timeout)
        if not frames:
            return collected
        collected.extend(frames)
        timeout = 0.2


def events_of(subscription, timeout=5.0):
    """The messages (tests.sse_client.Message) a subscription receives, heartbeats and resets left out."""
    return [m for m in parse_all(b"".join(frames_of(subscription, timeout))) if not m.type.startswith("stream.")]


@pytest.fixture
def spy():
    return SpyBroker()


def test_channel_subscribed_once_and_dropped_with_last_subscriber(spy, hub_factory):
    """Reference counting: the first local subscriber subscribes, the last one leaving unsubscribes."""
    hub = hub_factory(spy)
    first = hub.subscribe(["room:a"])
    second = hub.subscribe(["room:a", "room:b"])
    assert spy.data_commands() == [("subscribe", ["room:a"]), ("subscribe", ["room:b"])]
    first.close()
    assert hub.stats()["channels"] == 2
    second.close()
    wait_until(lambda: len(spy.data_commands()) == 3, what="the unsubscribe")
    assert spy.data_commands()[-1] == ("unsubscribe", ["room:a", "room:b"])
    assert hub.stats() == {"streams": 0, "adopted": 0, "channels": 0, "watched": 0, "connected": True}


def test_resubscribe_after_unsubscribe_waits_for_a_fresh_confirmation(spy, hub_factory):
    """A channel dropped and wanted again is subscribed again before the stream is live."""
    hub = hub_factory(spy)
    hub.subscribe(["room:a"]).close()
    wait_until(lambda: ("unsubscribe", ["room:a"]) in spy.data_commands(), what="the unsubscribe")
    again = hub.subscribe(["room:a"])
    assert spy.data_commands()[-1] == ("subscribe", ["room:a"])
    spy.publish("room:a", "t", "after")
    assert [event.data for event in events_of(again, 2)] == ["after"]


def test_events_reach_every_subscriber_of_the_channel_only(spy, hub_factory):
    """Fan-out: one event reaches every subscription on its channel and no other."""
    hub = hub_factory(spy)
    a1, a2, b = hub.subscribe(["room:a"]), hub.subscribe(["room:a"]), hub.subscribe(["room:b"])
    spy.publish("room:a", "t", "for a")
    assert [event.data for event in events_of(a1, 2)] == ["for a"]
    assert [event.data for event in events_of(a2, 2)] == ["for a"]
    assert events_of(b, 0.3) == []


def test_frame_is_encoded_once_and_shared(spy, hub_factory):
    """Every subscription queues the same frame object: an event is encoded once per process."""
    hub = hub_factory(spy, heartbeat_interval=30)
    subs = [hub.subscribe(["room:a"]) for _ in range(3)]
    spy.publish("room:a", "t", "x")
    received = [frames_of(sub, 2)[0] for sub in subs]
    assert received[0] is received[1] is received[2]
    assert b"data: x" in received[0]


def receive(subscription, data, timeout=5.0):
    """Read ``subscription`` until an event with ``data`` arrives; return the messages read."""
    seen = []
    wait_until(
        lambda: seen.extend(parse_all(b"".join(subscription.get(0.05)[1]))) or data in [m.data for m in seen],
        timeout,
        what=f"event {data!r}",
    )
    return seen


def test_overflow_closes_only_the_slow_subscription(spy, hub_factory):
    """A subscription whose bounded queue is full is closed; the others keep receiving."""
    hub = hub_factory(spy, queue_size=3)
    slow = hub.subscribe(["room:a"])
    fast = hub.subscribe(["room:a"])
    for number in range(5):
        spy.publish("room:a", "t", str(number))
        receive(fast, str(number))
    wait_until(lambda: slow.closed == OVERFLOW, what="the overflow")
    queued = [m.data for m in parse_all(b"".join(slow.get(0)[1])) if m.type == "t"]
    assert queued == ["0", "1", "2"], "the queue keeps what it held, bounded"
    spy.publish("room:a", "t", "later")
    receive(fast, "later")
    assert slow.get(0) == (None, [])
    assert hub.stats()["streams"] == 1


def test_closing_a_subscription_is_idempotent_and_frees_its_key(spy, hub_factory):
    """close() twice is harmless; the per-key count drops with it."""
    hub = hub_factory(spy, max_streams_per_owner=1)
    sub = hub.subscribe(["room:a"], owner=7)
    with pytest.raises(TooManyStreams):
        hub.subscribe(["room:b"], owner=7)
    sub.close()
    sub.close()
    hub.subscribe(["room:b"], owner=7)


def test_heartbeats_carry_the_hub_position(spy, hub_factory):
    """Every heartbeat interval each subscription gets the position the hub has dispatched."""
    hub = hub_factory(spy, heartbeat_interval=0.1)
    sub = hub.subscribe(["room:a"])
    hub.subscribe(["room:other"])
    pos = spy.publish("room:other", "t", "x")
    parser = SSEParser()
    frames = []

    def heartbeat_at_pos():
        got = sub.get(0.05)[1]
        frames.extend(got)
        dispatched = parser.feed(b"".join(got))
        assert dispatched == [], "heartbeats dispatch nothing (no data)"
        return parser.last_event_id and parse(parser.last_event_id) >= pos

    wait_until(heartbeat_at_pos, what="a heartbeat carrying the new position")
    assert any(frame.startswith(b"event: stream.position\nid: ") for frame in frames), "a named block"


def test_stalled_subscription_keeps_a_single_heartbeat(spy, hub_factory):
    """Heartbeats to a stream that does not read replace each other instead of piling up."""
    hub = hub_factory(spy, heartbeat_interval=0.05)
    sub = hub.subscribe(["room:a"])
    wait_until(lambda: len(sub._frames) == 1, what="a heartbeat")
    threading.Event().wait(0.3)  # several heartbeat intervals pass unread
    assert len(sub._frames) == 1


def test_reconnect_resubscribes_and_replays_what_was_missed(spy, hub_factory):
    """After a dropped connection the hub re-subscribes and replays history: no gap, no duplicate."""
    hub = hub_factory(spy, reconnect_delay=(0.05, 0.2))
    sub = hub.subscribe(["room:a"])
    spy.publish("room:a", "t", "before")
    assert [e.data for e in events_of(sub, 2)] == ["before"]
    spy.refuse.set()
    spy.listeners[-1].cut()
    wait_until(lambda: not hub.connected, what="the hub to notice")
    spy.publish("room:a", "t", "during")  # published while the hub is away
    with pytest.raises(BrokerUnavailable):
        hub.subscribe(["room:b"])  # new streams fail fast during the outage
    spy.refuse.clear()
    wait_until(lambda: hub.connected, what="the reconnection")
    spy.publish("room:a", "t", "after")
    assert [e.data for e in events_of(sub, 2)] == ["during", "after"]
    assert sub.closed is None
    resubscribed = [c for c in spy.data_commands() if c[0] == "subscribe"]
    assert resubscribed == [("subscribe", ["room:a"]), ("subscribe", ["room:a"])]


def test_reconnect_resets_streams_whose_history_was_trimmed_before_any_later_event(hub_factory):
    """Events trimmed while the hub was away: their streams get stream.reset before anything after the hole."""
    spy = SpyBroker(history_length=2)
    hub = hub_factory(spy, reconnect_delay=(0.05, 0.2), heartbeat_interval=30)
    sub = hub.subscribe(["room:a"])
    other = hub.subscribe(["room:b"])
    spy.publish("room:a", "t", "before")
    receive(sub, "before")
    spy.refuse.set()
    spy.listeners[-1].cut()
    wait_until(lambda: not hub.connected, what="the hub to notice")
    for number in range(4):
        spy.publish("room:a", "t", str(number))  # "0" and "1" are trimmed
    spy.publish("room:b", "t", "b")
    spy.refuse.clear()
    wait_until(lambda: hub.connected, what="the reconnection")
    last = spy.publish("room:a", "t", "after")
    messages = parse_all(b"".join(frames_of(sub, 2)))
    kinds = [(m.type, m.data) for m in messages if m.type != "stream.position"]
    assert kinds[0] == ("stream.reset", json.dumps({"reason": "trimmed"})), "the reset comes first"
    assert all(m[0] != "t" or m[1] == "after" for m in kinds[1:]), "nothing from before the reset after it"
    assert kinds[-1] == ("t", "after") and messages[-1].last_event_id == format_id(last)
    assert sub.closed is None and other.closed is None, "streams stay open"
    assert [m.data for m in events_of(other, 0.3)] == ["b"], "a channel without a hole replays, no reset"


def test_unconfirmed_subscription_times_out_with_broker_unavailable(spy, hub_factory, monkeypatch):
    """subscribe() raises BrokerUnavailable when the broker never confirms, and leaves no trace."""
    hub = hub_factory(spy)
    monkeypatch.setattr(SpyListener, "subscribe", lambda self, channels: None)
    with pytest.raises(BrokerUnavailable, match="did not confirm"):
        hub.subscribe(["room:silent"], timeout=0.3)
    assert hub.stats()["streams"] == 0


def test_stop_closes_every_subscription(spy, hub_factory):
    """Stopping the hub (worker shutdown) closes all streams with the reason given."""
    hub = hub_factory(spy)
    subs = [hub.subscribe([f"room:{n}"]) for n in range(3)]
    hub.stop(SHUTDOWN)
    assert [sub.closed for sub in subs] == [SHUTDOWN] * 3
    with pytest.raises(BrokerUnavailable):
        hub.subscribe(["room:a"])


def test_dead_marker_triggers_reconnect(spy, hub_factory, monkeypatch):
    """A connection whose markers never come back counts as dead: the hub reconnects."""
    hub = hub_factory(spy, heartbeat_interval=0.1, liveness_timeout=0.3)
    first = spy.listeners[-1]
    monkeypatch.setattr(first, "publish_marker", lambda: None)  # a half-open connection
    wait_until(lambda: len(spy.listeners) >= 2 and hub.connected, timeout=5, what="a new listener")


def test_process_hub_is_created_once_under_a_burst(memory_broker):
    """get_hub() builds exactly one hub even when many threads ask at once."""
    from myapp.hub import get_hub

    hubs = []
    threads = [threading.Thread(target=lambda: hubs.append(get_hub())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(hub) for hub in hubs}) == 1


def test_broker_whose_order_went_back_resets_streams_and_skips_nothing(spy, hub_factory, monkeypatch):
    """A broker that lost writes the hub saw (a failover to a lagging replica): streams reset, then get new events."""
    from myapp.brokers import memory
    from myapp.ids import SEQ_BITS, milliseconds

    hub = hub_factory(spy, reconnect_delay=(0.05, 0.2), heartbeat_interval=30)
    sub = hub.subscribe(["room:a"])
    seen = spy.publish("room:a", "t", "seen")
    receive(sub, "seen")
    spy.refuse.set()
    spy.listeners[-1].cut()
    wait_until(lambda: not hub.connected, what="the hub to notice")
    # The replica that takes over never got the last writes, and its clock is 50 ms behind.
    behind = milliseconds(seen) - 50
    spy._last = behind << SEQ_BITS
    spy._channels["room:a"].clear()
    monkeypatch.setattr(memory.time, "time", lambda: behind / 1000)
    spy.refuse.clear()
    wait_until(lambda: hub.connected, what="the reconnection")
    after = spy.publish("room:a", "t", "after")
    assert after < seen, "the new server hands out positions below what the stream was sent"
    messages = parse_all(b"".join(frames_of(sub, 2)))
    kinds = [(m.type, m.data) for m in messages if m.type != "stream.position"]
    assert kinds == [("stream.reset", json.dumps({"reason": "trimmed"})), ("t", "after")]
    assert parse(messages[0].last_event_id) < seen, "the reset moves the browser's id back"
    assert messages[-1].last_event_id == format_id(after)


def test_a_full_worker_refuses_new_streams(spy, hub_factory):
    """max_streams bounds a hub's streams; one closing makes room again."""
    from myapp.hub import WorkerFull

    hub = hub_factory(spy, max_streams=2)
    first = hub.subscribe(["room:a"])
    hub.subscribe(["room:b"])
    with pytest.raises(WorkerFull):
        hub.subscribe(["room:c"])
    first.close()
    hub.subscribe(["room:c"])
