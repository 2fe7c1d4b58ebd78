"""The hub's counters (myapp.counters): plain ints bumped where things happen, exact per hub."""

import socket
import threading
import time

import pytest

from myapp.brokers.memory import MemoryBroker, MemoryListener
from myapp.exceptions import BrokerUnavailable
from myapp.ids import format_id
from myapp.sink import Sink, chunk
from myapp.stream import open_stream
from myapp.subscription import OVERFLOW, SHUTDOWN, UNSUBSCRIBED
from tests.conftest import wait_until


class FlakyBroker(MemoryBroker):
    """A memory broker whose listener can be cut and refused, to make outages."""

    def __init__(self, **options):
        super().__init__(**options)
        self.refuse = threading.Event()
        self.listeners = []

    def listener(self, hub_channel):
        if self.refuse.is_set():
            raise BrokerUnavailable("refused by the test")
        listener = MemoryListener(self, hub_channel)
        self.listeners.append(listener)
        return listener


@pytest.fixture
def broker():
    return FlakyBroker(history_length=100, history_ttl=60)


@pytest.fixture
def pair():
    sock, peer = socket.socketpair()
    yield sock, peer
    sock.close()
    peer.close()


def served(hub, sock, channels=("room:a",)):
    """Open a stream with direct writes to ``sock`` and serve it (one chunk per yield) in a thread."""
    stream = open_stream(hub, channels)
    stream.attach(_Response(), sink=Sink(sock, chunked=True))

    def serve():
        try:
            for frame in stream:
                sock.sendall(chunk(frame))
        except OSError:
            pass
        finally:
            stream.close()

    threading.Thread(target=serve, daemon=True).start()
    wait_until(lambda: stream._subscription._sink is not None, what="the stream to park")
    return stream


class _Response:
    def has_header(self, name):
        return False


def test_hub_counts_direct_writes_and_queued_events_apart(broker, hub_factory, pair):
    """An event written to a parked stream's socket counts as direct; one put in a busy stream's queue as queued."""
    hub = hub_factory(broker, heartbeat_interval=30)
    served(hub, pair[0])
    busy = hub.subscribe(["room:a"])  # nobody reads it: its events wait in its queue
    for number in range(3):
        broker.publish("room:a", "t", str(number))
    wait_until(lambda: hub.counters.direct == 3 and hub.counters.queued == 3, what="3 direct and 3 queued")
    assert hub.counters.replayed == 0 and busy.closed is None


def test_heartbeats_are_not_counted_as_events(broker, hub_factory):
    """Only events count as delivered: heartbeats offered to streams do not."""
    hub = hub_factory(broker, heartbeat_interval=0.1)
    sub = hub.subscribe(["room:a"])
    wait_until(lambda: sub.get(0.5)[1], what="a heartbeat")
    assert (hub.counters.direct, hub.counters.queued) == (0, 0)


def test_hub_counts_replayed_events_and_resets_by_reason(broker, hub_factory):
    """A resumed stream counts its replay; a Last-Event-ID that cannot be resumed counts a reset by reason."""
    hub = hub_factory(broker, heartbeat_interval=30)
    positions = [broker.publish("room:a", "t", str(number)) for number in range(5)]
    hub.subscribe(["room:a"], last_event_id=format_id(positions[0]))
    hub.subscribe(["room:a"], last_event_id="not-an-id")
    hub.subscribe(["room:a"], last_event_id=format_id(positions[-1] + (1 << 30)))
    hub.subscribe(["room:a"])  # fresh: neither replay nor reset
    assert hub.counters.replayed == 4
    assert hub.counters.resets == {"malformed": 1, "unknown": 1}


def test_hub_counts_closes_by_reason(broker, hub_factory):
    """Each closed subscription counts once, under the reason it closed with."""
    hub = hub_factory(broker, heartbeat_interval=30, queue_size=2)
    left, slow, stopped = (hub.subscribe([f"room:{name}"]) for name in "abc")
    left.close()
    left.close()  # twice: still one close
    for number in range(3):
        broker.publish("room:b", "t", str(number))
    wait_until(lambda: slow.closed == OVERFLOW, what="the overflow")
    hub.stop(SHUTDOWN)
    assert stopped.closed == SHUTDOWN
    assert hub.counters.closes == {UNSUBSCRIBED: 1, OVERFLOW: 1, SHUTDOWN: 1}


def test_a_reconnection_counts_once_with_its_outage(broker, hub_factory):
    """The reconnection that ends an outage counts once, with the outage's seconds."""
    hub = hub_factory(broker, heartbeat_interval=30, reconnect_delay=(0.05, 0.1))
    broker.refuse.set()
    broker.listeners[-1].close()
    wait_until(lambda: hub.outage_started is not None, what="the outage to start")
    started = hub.outage_started
    wait_until(lambda: time.monotonic() - started > 0.2, what="a 0.2 s outage")
    assert hub.counters.reconnects == 0, "failed attempts do not count"
    broker.refuse.clear()
    wait_until(lambda: hub.connected, what="the reconnection")
    assert hub.counters.reconnects == 1
    assert 0.2 < hub.counters.outage_seconds < time.monotonic() - started
