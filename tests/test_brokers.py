"""The broker contract: the same assertions over the memory, Redis, Redis Cluster and PostgreSQL backends.

Positions compare within a partition (``myapp.ids``): every backend but Redis
Cluster has one, so there the ordering assertions span all channels.
"""

import json

import pytest
from django.db import transaction

from myapp.brokers.base import Subscribed
from myapp.events import Event
from myapp.exceptions import BrokerUnavailable, InvalidEvent
from myapp.ids import format_id, milliseconds, parse
from myapp.publish import send_event
from myapp.stream import open_stream
from tests.conftest import wait_until
from tests.sse_client import SSEParser

pytestmark = pytest.mark.django_db(transaction=True)


class Collector:
    """Reads a listener and keeps what it delivered."""

    def __init__(self, listener):
        self.listener = listener
        self.events = []
        self.confirmed = set()

    def pump(self, timeout=0.05):
        for item in self.listener.wait(timeout):
            if isinstance(item, Subscribed):
                self.confirmed.add(item.channel)
            elif isinstance(item, Event) and not item.channel.startswith("!hub"):
                self.events.append(item)

    def subscribe(self, *channels):
        self.listener.subscribe(list(channels))
        wait_until(lambda: self.pump() or set(channels) <= self.confirmed, what=f"confirmation of {channels}")

    def wait_events(self, count, timeout=10.0):
        wait_until(lambda: self.pump() or len(self.events) >= count, timeout, what=f"{count} events")
        return self.events


def per_channel(broker, rows):
    """``rows`` (tuples starting with a channel) as they are, or grouped by channel on a partitioned broker.

    Events of two partitions reach a listener over two node connections, in no
    order between them; within a channel (a partition) the order holds.
    """
    return rows if broker.partitions == 1 else sorted(rows, key=lambda row: row[0])


@pytest.fixture
def collector(broker):
    listener = broker.listener("!hub:contract")
    yield Collector(listener)
    listener.close()


def test_publish_reaches_subscribed_channels_only(broker, collector):
    """A listener gets events of the channels it subscribed to, not of others."""
    collector.subscribe("room:a", "room:b")
    broker.publish("room:c", "t", "not for us")
    pos_a = broker.publish("room:a", "greeting", '"hello"')
    pos_b = broker.publish("room:b", "greeting", '"hi"')
    events = collector.wait_events(2)
    assert per_channel(broker, [(e.channel, e.pos, e.event_type, e.data) for e in events]) == [
        ("room:a", pos_a, "greeting", '"hello"'),
        ("room:b", pos_b, "greeting", '"hi"'),
    ]


def test_unsubscribe_stops_delivery(broker, collector):
    """After unsubscribe, the channel's events no longer arrive; other channels still do."""
    collector.subscribe("room:a", "room:b")
    collector.listener.unsubscribe(["room:a"])
    broker.publish("room:a", "t", "dropped")
    broker.publish("room:b", "t", "kept")
    assert [e.data for e in collector.wait_events(1)] == ["kept"]
    collector.pump(0.2)
    assert [e.data for e in collector.events] == ["kept"]


def same_partition(broker, channel):
    """Another channel name in ``channel``'s partition ("room:b" on a broker with one partition)."""
    for n in range(10_000):
        other = f"room:b{n}" if n else "room:b"
        if broker.partition(other) == broker.partition(channel):
            return other
    raise AssertionError("no channel found in the same partition")


def test_positions_increase_in_delivery_order_across_channels(broker, collector):
    """Positions grow strictly, per channel and across the channels of a partition, in the order listeners
    receive them."""
    other = same_partition(broker, "room:a")
    collector.subscribe("room:a", other)
    published = [broker.publish("room:a" if n % 3 else other, "t", str(n)) for n in range(30)]
    events = collector.wait_events(30)
    assert [e.pos for e in events] == published
    assert published == sorted(set(published))
    assert broker.heads()[broker.partition("room:a")] == published[-1]
    assert {e.part for e in events} == {broker.partition("room:a")}
    assert [e.data for e in events] == [str(n) for n in range(30)]


@pytest.mark.parametrize(
    "data",
    ["", "é ü 中文 \U0001f680", "line\nbreaks\r\nand\rmore", "x" * 7990, "y" * 8200, "z" * 65536 + "\u00e9" * 40000],
    ids=["empty", "unicode", "line breaks", "just under NOTIFY limit", "just over NOTIFY limit", "over 64 KiB"],
)
def test_payloads_arrive_intact(broker, collector, data):
    """Any data, including unicode and payloads far over PostgreSQL's 8000-byte NOTIFY limit, arrives intact."""
    collector.subscribe("room:a")
    pos = broker.publish("room:a", "t", data)
    (event,) = collector.wait_events(1)
    assert (event.pos, event.data) == (pos, data)
    assert [e.data for e in broker.history(["room:a"], 0).events] == [data]


# Values some backend cannot store as they are (PostgreSQL text refuses NUL; NOTIFY
# payloads are text too): every backend must deliver them byte-exact, or all refuse.
STORABLE_ANYWHERE = {
    "NUL": "a\x00b",
    "only NUL": "\x00",
    "NUL at both ends": "\x00middle\x00",
    "U+FFFF": "non\uffffcharacter",
    "U+10FFFF": "last \U0010ffff code point",
    "BOM": "\ufeffat the start and \ufeff inside",
    "CR LF CRLF": "a\rb\nc\r\nd\r",
    "NUL and line breaks": "\x00\r\n\x00\n",
    "NUL over the NOTIFY limit": "\x00" + "x" * 8200,
    "64 KiB with NUL": "y" * 65536 + "\x00" + "\u00e9" * 1000,
}


@pytest.mark.parametrize("data", STORABLE_ANYWHERE.values(), ids=STORABLE_ANYWHERE.keys())
def test_raw_data_any_backend_may_not_store_is_delivered_byte_exact(broker, collector, hub_factory, data):
    """Raw data with NUL, noncharacters, a BOM or bare CRs is published; listener, history, stream carry it exactly."""
    hub = hub_factory(broker)
    stream = open_stream(hub, ("room:raw",))
    frames = iter(stream)
    next(frames)
    collector.subscribe("room:raw")
    event_id = send_event("room:raw", "t", data, raw=True)
    (event,) = collector.wait_events(1)
    assert (event.id, event.data) == (event_id, data)
    assert [e.data for e in broker.history(["room:raw"], 0).events] == [data]
    expected = Event("room:raw", parse(event_id), "t", data).frame
    wire = b""
    while expected not in wire:
        wire += next(frames)
    stream.close()


@pytest.mark.parametrize(
    "data", ["\ud800", "tail \udfff", "pair in the wrong order \udc00\ud800"], ids=["lone high", "lone low", "reversed"]
)
def test_raw_lone_surrogates_are_refused_alike(broker, data):
    """Raw data with lone surrogates (not UTF-8-encodable) is InvalidEvent on every backend; nothing is published."""
    before = broker.last_position()
    with pytest.raises(InvalidEvent, match="lone surrogate"):
        send_event("room:a", "t", data, raw=True)
    assert broker.last_position() == before
    assert broker.history(["room:a"], 0).events == []


def test_json_with_nul_and_lone_surrogates_is_delivered_escaped(broker, collector):
    """JSON data carrying NUL or lone surrogates goes out as JSON escapes on every backend."""
    collector.subscribe("room:a")
    send_event("room:a", "t", {"text": "a\x00b\ud800"})
    (event,) = collector.wait_events(1)
    assert event.data == '{"text":"a\\u0000b\\ud800"}'
    assert json.loads(event.data) == {"text": "a\x00b\ud800"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channel": "room\x00a"}, "channel may only contain"),
        ({"event_type": "t\x00"}, "event type must not contain CR, LF or NUL"),
        ({"id": "key\x00"}, "id must not contain CR, LF or NUL"),
        ({"event_type": "t\ud800"}, "lone surrogate"),
        ({"id": "\udfff"}, "lone surrogate"),
    ],
    ids=["NUL in channel", "NUL in event type", "NUL in id", "surrogate in event type", "surrogate in id"],
)
def test_names_no_backend_can_carry_are_refused_alike(broker, kwargs, message):
    """NUL or lone surrogates in a channel, event type or id: InvalidEvent on every backend, never BrokerUnavailable."""
    arguments = {"channel": "room:a", "event_type": "t", "data": "d", **kwargs}
    before = broker.last_position()
    with pytest.raises(InvalidEvent, match=message):
        send_event(arguments.pop("channel"), arguments.pop("event_type"), arguments.pop("data"), **arguments)
    assert broker.last_position() == before


def test_postgres_data_error_is_invalid_event_not_an_outage(postgres_broker):
    """A value PostgreSQL refuses (a NUL in a channel, bypassing validation) is InvalidEvent; the broker goes on."""
    with pytest.raises(InvalidEvent, match="PostgreSQL cannot store") as raised:
        postgres_broker.publish("room\x00a", "t", "data")
    assert not isinstance(raised.value, BrokerUnavailable)
    collector = Collector(postgres_broker.listener("!hub:data-error"))
    try:
        collector.subscribe("room:a")
        pos = postgres_broker.publish("room:a", "t", "after")
        assert [(e.pos, e.data) for e in collector.wait_events(1)] == [(pos, "after")]
    finally:
        collector.listener.close()


def test_history_after_a_position(broker):
    """history() returns each channel's events after a position (on Redis Cluster, one per partition),
    merged in position order."""
    heads = broker.heads()
    first = broker.publish("room:a", "t", "1")
    second = broker.publish("room:b", "t", "2")
    third = broker.publish("room:a", "t", "3")
    after = first
    if broker.partitions > 1:  # room:a after its first event, the other partitions after their heads before it
        after = [first if part == broker.partition("room:a") else head for part, head in enumerate(heads)]
    history = broker.history(["room:a", "room:b", "room:none"], after)
    assert per_channel(broker, [(e.channel, e.pos, e.data) for e in history.events]) == per_channel(
        broker, [("room:b", second, "2"), ("room:a", third, "3")]
    )
    assert history.trimmed == frozenset()
    assert broker.history(["room:a"], third).events == []


#: Events a backend may keep beyond history_length: Redis trims its streams in whole nodes
#: (``MAXLEN ~``, stream-node-max-entries 100); the memory and PostgreSQL backends trim exactly.
TRIM_SLACK = {"memory": 0, "postgres": 0, "redis": 100, "redis_cluster": 100}


def test_history_length_bounds_and_reports_trimming(broker, request):
    """At least history_length events stay per channel (within the backend's slack); resuming from before
    what stays is reported as trimmed, from within it is not."""
    backend = request.node.callspec.params["broker"]
    broker.history_length = 3
    positions = [broker.publish("room:a", "t", str(n)) for n in range(250)]
    kept = broker.history(["room:a"], 0)
    data = [e.data for e in kept.events]
    assert 3 <= len(data) <= 3 + TRIM_SLACK[backend]
    assert data == [str(n) for n in range(250 - len(data), 250)], "the newest, in order"
    assert kept.trimmed == frozenset({"room:a"}), "events after position 0 were trimmed"
    assert broker.history(["room:a"], positions[-4]).trimmed == frozenset(), "nothing missing after it"
    assert broker.history(["room:a"], positions[1]).trimmed == frozenset({"room:a"})


def test_publisher_id_makes_publishing_idempotent(broker, collector):
    """Publishing twice with the same publisher id delivers once and returns the first position."""
    collector.subscribe("room:a")
    first = broker.publish("room:a", "t", "once", idempotency_key="order-42")
    again = broker.publish("room:a", "t", "once", idempotency_key="order-42")
    other = broker.publish("room:a", "t", "other", idempotency_key="order-43")
    assert first == again != other
    assert [e.data for e in collector.wait_events(2)] == ["once", "other"]
    collector.pump(0.2)
    assert len(collector.events) == 2


def test_publisher_ids_are_scoped_to_their_channel(broker, collector):
    """The same publisher id on two channels, or ids that would collide if joined naively, publish both."""
    collector.subscribe("a", "a:b")
    first = broker.publish("a", "t", "one", idempotency_key="b:c")
    second = broker.publish("a:b", "t", "two", idempotency_key="c")
    third = broker.publish("a:b", "t", "three", idempotency_key="b:c")
    assert len({first, second, third}) == 3
    delivered = [(e.channel, e.data) for e in collector.wait_events(3)]
    assert per_channel(broker, delivered) == [("a", "one"), ("a:b", "two"), ("a:b", "three")]


def test_redis_history_after_a_data_loss_reports_every_channel_trimmed(redis_broker):
    """A Redis server that lost its data starts a new epoch: ids from before it cannot be resumed."""
    before = redis_broker.publish("room:a", "t", "lost")
    _wipe(redis_broker)
    # A real restart takes far longer than the millisecond that positions count.
    wait_until(lambda: _server_ms(redis_broker) > milliseconds(before), what="the server clock to move on")
    after = redis_broker.publish("room:a", "t", "kept")
    history = redis_broker.history(["room:a", "room:quiet"], before)
    assert before < history.epoch < after
    assert history.trimmed == frozenset({"room:a", "room:quiet"}), "what followed `before` may be gone"
    since_epoch = redis_broker.history(["room:a", "room:quiet"], history.epoch)
    assert [e.data for e in since_epoch.events] == ["kept"]
    assert since_epoch.trimmed == frozenset()
    assert redis_broker.history(["room:a"], after).trimmed == frozenset(), "ids of the new epoch resume"


def _server_ms(redis_broker):
    seconds, microseconds = redis_broker._client.time()
    return seconds * 1000 + microseconds // 1000


def _wipe(redis_broker):
    """Delete every key of the broker, as a restart without persistence does."""
    client = redis_broker._client
    keys = list(client.scan_iter(match=redis_broker.prefix + "*"))
    if keys:
        client.delete(*keys)


def test_marker_comes_back_with_a_position(broker):
    """A listener's marker takes a position and returns through that same listener."""
    listener = broker.listener("!hub:marker-test")
    try:
        before = broker.heads()
        listener.publish_marker()
        seen = []

        def returned():
            seen.extend(i for i in listener.wait(0.05) if isinstance(i, Event) and i.channel == "!hub:marker-test")
            return seen

        (marker,) = wait_until(returned)
        assert marker.pos > before[marker.part]
    finally:
        listener.close()


def test_send_event_inside_a_transaction_waits_for_commit(broker, collector):
    """Inside atomic(), send_event publishes after COMMIT, and never on rollback."""
    collector.subscribe("room:a")
    with transaction.atomic():
        assert send_event("room:a", "t", {"n": 1}) is None
        collector.pump(0.2)
        assert collector.events == [], "nothing before COMMIT"
    assert [json.loads(e.data) for e in collector.wait_events(1)] == [{"n": 1}]
    with pytest.raises(RuntimeError), transaction.atomic():
        send_event("room:a", "t", {"n": 2})
        raise RuntimeError("roll back")
    send_event("room:a", "t", {"n": 3})
    assert [json.loads(e.data) for e in collector.wait_events(2)] == [{"n": 1}, {"n": 3}]


def test_streams_share_the_subscription_and_clean_up(broker, hub_factory):
    """Two streams on one channel share one broker subscription; closing both leaves the hub empty."""
    hub = hub_factory(broker)
    first = open_stream(hub, ("room:a",))
    second = open_stream(hub, ("room:a",))
    frames = iter(first), iter(second)
    parsers = SSEParser(), SSEParser()
    for parser, stream in zip(parsers, frames, strict=True):
        assert [m.type for m in parser.feed(next(stream))] == ["stream.open"]
    assert hub.stats() == {"streams": 2, "adopted": 0, "channels": 1, "watched": 0, "connected": True}
    pos = broker.publish("room:a", "t", '"both"')
    for parser, stream in zip(parsers, frames, strict=True):
        assert [(m.type, m.data, m.last_event_id) for m in parser.feed(next(stream))] == [
            ("t", '"both"', format_id(pos))
        ]
    first.close()
    assert hub.stats()["streams"] == 1
    second.close()
    assert hub.stats() == {"streams": 0, "adopted": 0, "channels": 0, "watched": 0, "connected": True}


def test_stream_resumes_each_channel_from_one_id(broker, hub_factory):
    """A stream carrying two channels (on Redis Cluster, of two partitions) replays both from one Last-Event-ID,
    in order per channel, without duplicates; then it goes on live."""
    hub = hub_factory(broker)
    channels = ("room:a", "room:b")
    if broker.partitions > 1:
        assert broker.partition("room:a") != broker.partition("room:b"), "the test needs two partitions"
    first = open_stream(hub, channels)
    frames = iter(first)
    parser = SSEParser()
    parser.feed(next(frames))
    broker.publish("room:b", "t", "seen b")
    broker.publish("room:a", "t", "seen a")
    seen = []
    while len(seen) < 2:
        seen += [m for m in parser.feed(next(frames)) if m.type == "t"]
    first.close()
    last_event_id = seen[-1].last_event_id
    missed = [(channel, f"missed {n}", broker.publish(channel, "t", f"missed {n}")) for n, channel in
              enumerate(["room:a", "room:b"] * 3)]  # fmt: skip
    stream = open_stream(hub, channels, last_event_id)
    frames = iter(stream)
    parser = SSEParser()
    messages = parser.feed(next(frames))
    assert [m.type for m in messages] == ["stream.open"] + ["t"] * 6
    received = [m.data for m in messages[1:]]
    assert sorted(received) == sorted(data for _, data, _ in missed), "each once"
    for channel in channels:
        of_channel = [data for name, data, _ in missed if name == channel]
        assert [data for data in received if data in of_channel] == of_channel, "in order per channel"
    if broker.partitions == 1:
        assert [parse(m.last_event_id) for m in messages[1:]] == [pos for _, _, pos in missed]
    broker.publish("room:b", "t", "live")
    wire = b""
    while b"data: live" not in wire:
        wire += next(frames)
    resumed = open_stream(hub, channels, parser.feed(wire)[-1].last_event_id)
    assert [m.type for m in SSEParser().feed(next(iter(resumed)))] == ["stream.open"], "nothing after the live one"
    resumed.close()
    stream.close()


@pytest.mark.parametrize(
    "channel",
    [
        "room'; DROP TABLE myapp_postgres_event; --",
        'quoted"identifier',
        "x" * 200,
        "ünïcödé-チャンネル-" * 5,
        "UPPER:lower",
    ],
    ids=["SQL injection", "double quote", "200 bytes", "unicode over 63 bytes", "case"],
)
def test_postgres_maps_any_channel_name_safely(postgres_broker, channel):
    """Hostile or long names (bypassing the API's charset) LISTEN, NOTIFY and store safely."""
    from django.db import connection

    from myapp.brokers.postgres import pg_channel

    assert len(pg_channel(channel).encode()) <= 63
    collector = Collector(postgres_broker.listener("!hub:hostile"))
    try:
        collector.subscribe(channel, "UPPER:LOWER")
        pos = postgres_broker.publish(channel, "t", "payload")
        (event,) = collector.wait_events(1)
        assert (event.channel, event.pos) == (channel, pos)
        assert [e.data for e in postgres_broker.history([channel], 0).events] == ["payload"]
    finally:
        collector.listener.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM myapp_postgres_event")
        assert cursor.fetchone()[0] == 1, "the table is intact"


def test_presence_sums_over_live_hubs(broker):
    """Presence entries of several hubs add up; a hub can be left out; a count of 0 removes an entry."""
    broker.presence_update("hub-a", {("c:room:a", "1"): 2, ("c:room:a", "-"): 1}, 30)
    broker.presence_update("hub-b", {("c:room:a", "1"): 1, ("c:room:a", "2"): 1, ("o:1", "n"): 4}, 30)
    assert broker.presence_read("c:room:a") == {"1": 3, "-": 1, "2": 1}
    assert broker.presence_read("c:room:a", exclude="hub-a") == {"1": 1, "2": 1}
    assert broker.presence_read("o:1") == {"n": 4}
    broker.presence_update("hub-b", {("c:room:a", "2"): 0}, 30)
    assert broker.presence_read("c:room:a") == {"1": 3, "-": 1}
    assert broker.presence_read("c:room:none") == {}


def test_presence_of_a_hub_whose_ttl_passed_no_longer_counts(broker):
    """A hub that stops renewing (a crashed worker) drops out once its time-to-live passed; renewing brings it back."""
    broker.presence_update("hub-dead", {("c:room:a", "1"): 1}, 0.3)
    broker.presence_update("hub-live", {("c:room:a", "2"): 1}, 30)
    assert broker.presence_read("c:room:a") == {"1": 1, "2": 1}
    wait_until(lambda: broker.presence_read("c:room:a") == {"2": 1}, timeout=5, what="the dead hub to drop out")
    broker.presence_update("hub-dead", {("c:room:a", "1"): 1}, 30)
    assert broker.presence_read("c:room:a") == {"1": 1, "2": 1}
