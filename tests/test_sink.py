"""Direct writes (myapp.sink): the hub writes to parked streams' sockets; the bytes stay exact and in order."""

import socket
import threading

import pytest

from myapp.brokers.memory import MemoryBroker
from myapp.events import Event
from myapp.sink import Sink, chunk, os_socket, sink_for
from myapp.stream import open_stream
from myapp.subscription import GREENLETS
from tests.conftest import wait_until
from tests.sse_client import ChunkedDecoder, SSEParser


class Served:
    """A stream served the way gunicorn serves it (each yielded frame as one chunk), read by a peer socket."""

    def __init__(self, stream, sock, peer):
        self.stream = stream
        self.sock = sock
        self.peer = peer
        self.yields = 0
        self.raw = b""
        self.parser = SSEParser()
        self.decoder = ChunkedDecoder()
        self.messages = []
        self.reading = threading.Event()
        self.reading.set()
        self.lock = threading.Lock()
        self.server = threading.Thread(target=self._serve, daemon=True)
        self.client = threading.Thread(target=self._read, daemon=True)
        self.server.start()
        self.client.start()

    def _serve(self):
        try:
            for frame in self.stream:
                self.yields += 1
                self.sock.sendall(chunk(frame))
        except OSError:
            pass
        finally:
            self.stream.close()

    def _read(self):
        while True:
            self.reading.wait()
            try:
                data = self.peer.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.raw += data
                self.messages.extend(self.parser.feed(self.decoder.feed(data)))

    def data(self, event_type="t"):
        with self.lock:
            return [m.data for m in self.messages if m.type == event_type]


@pytest.fixture
def broker():
    return MemoryBroker(history_length=1000, history_ttl=60)


@pytest.fixture
def pair():
    sock, peer = socket.socketpair()
    yield sock, peer
    sock.close()
    peer.close()


def serve(hub, pair, *, response=None, channels=("room:a",)):
    sock, peer = pair
    stream = open_stream(hub, channels)
    stream.attach(response or _Response(), sink=Sink(sock, chunked=True))
    served = Served(stream, sock, peer)
    wait_until(lambda: served.messages, what="the first frame")
    return served


class _Response:
    def __init__(self, **headers):
        self.headers = headers

    def has_header(self, name):
        return name in self.headers


def test_parked_stream_is_written_directly_and_exactly(broker, hub_factory, pair):
    """Events reach an idle stream's socket as exact chunks, in order, without waking its greenlet."""
    hub = hub_factory(broker, heartbeat_interval=30)
    served = serve(hub, pair)
    first = served.raw
    positions = [broker.publish("room:a", "t", f"line {n}\r\nnext") for n in range(20)]
    wait_until(lambda: len(served.data()) == 20, what="20 events")
    assert served.data() == [f"line {n}\nnext" for n in range(20)]
    events = [Event("room:a", pos, "t", f"line {n}\r\nnext") for n, pos in enumerate(positions)]
    assert served.raw == first + b"".join(event.chunk for event in events), "byte for byte, one chunk per event"
    assert served.yields == 1, "only the first frame went through the server's write path"


def test_slow_reader_gets_every_event_once_in_order(broker, hub_factory, pair):
    """When the socket is full, the rest goes to the stream, which writes it first; nothing lost or doubled."""
    sock, peer = pair
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hub = hub_factory(broker, heartbeat_interval=0.05)
    served = serve(hub, pair)
    served.reading.clear()  # the client stops reading
    payload = "x" * 3000
    for n in range(60):
        broker.publish("room:a", "t", f"{n}:{payload}")
    subscription = served.stream._subscription
    # 180 KB cannot fit in the socket buffers: the hub hands the rest over.
    wait_until(lambda: subscription._sink is None, what="the stream to take over from the hub")
    served.reading.set()
    wait_until(lambda: len(served.data()) == 60, timeout=20, what="all 60 events")
    assert served.data() == [f"{n}:{payload}" for n in range(60)]
    assert served.yields > 1, "the queued events went through the stream's own writes"
    broker.publish("room:a", "t", "after")
    wait_until(lambda: served.data()[-1:] == ["after"], what="a live event once the client caught up")
    assert served.decoder.buffer == b"", "the chunked framing stayed whole"


def test_disconnected_client_ends_the_stream(broker, hub_factory, pair):
    """A direct write to a closed connection closes the subscription and ends the stream quietly."""
    hub = hub_factory(broker, heartbeat_interval=30)
    served = serve(hub, pair)
    pair[1].close()
    wait_until(lambda: broker.publish("room:a", "t", "x") and hub.stats()["streams"] == 0, what="the hub to notice")
    served.server.join(5)
    assert not served.server.is_alive(), "the stream ended"


def test_heartbeats_are_written_directly(broker, hub_factory, pair):
    """Heartbeats reach an idle stream's socket from the hub's heartbeat thread."""
    hub = hub_factory(broker, heartbeat_interval=0.05)
    served = serve(hub, pair)

    def heartbeats():
        raw = served.raw
        return raw.count(b"event: stream.position\nid: ") + raw.count(b"\r\n:\n\n")

    wait_until(lambda: heartbeats() >= 3, what="three heartbeats")
    assert served.yields == 1


def test_compressed_response_is_never_written_directly(broker, hub_factory, pair):
    """A response a middleware gave a Content-Encoding keeps every write in the server's path."""
    hub = hub_factory(broker, heartbeat_interval=30)
    served = serve(hub, pair, response=_Response(**{"Content-Encoding": "gzip"}))
    broker.publish("room:a", "t", "one")
    wait_until(lambda: served.data() == ["one"], what="the event")
    broker.publish("room:a", "t", "two")
    wait_until(lambda: served.data() == ["one", "two"], what="the second event")
    assert served.yields >= 2


GUNICORN = {"SERVER_SOFTWARE": "gunicorn/27.0.1", "SERVER_PROTOCOL": "HTTP/1.1"}


@pytest.mark.parametrize(
    "environ, enabled, expected",
    [
        pytest.param({**GUNICORN}, True, "chunked", id="http-1.1"),
        pytest.param({**GUNICORN, "SERVER_PROTOCOL": "HTTP/1.0"}, True, "raw", id="http-1.0"),
        pytest.param({**GUNICORN, "SERVER_PROTOCOL": "HTTP/2"}, True, None, id="http-2"),
        pytest.param({**GUNICORN}, False, None, id="setting-off"),
        pytest.param({**GUNICORN, "SERVER_SOFTWARE": "WSGIServer/0.2"}, True, None, id="not-gunicorn"),
    ],
)
def test_sink_only_where_the_wire_format_is_known(pair, environ, enabled, expected):
    """sink_for gives a sink only for gunicorn's plain sockets over HTTP/1.x with the setting on."""
    sink = sink_for({**environ, "gunicorn.socket": pair[0]}, enabled=enabled)
    assert (None if sink is None else "chunked" if sink.chunked else "raw") == expected


def test_no_sink_for_tls_or_a_socket_with_a_timeout(pair):
    """A TLS socket (another type) or one whose OS socket has a timeout (a send could wait) gets no sink.

    Under gevent a socket's timeout lives in gevent: its OS socket stays
    non-blocking, so a MSG_DONTWAIT send still never waits and the sink stays.
    """

    class TLSLike(socket.socket):
        pass

    with TLSLike() as other:
        assert sink_for({**GUNICORN, "gunicorn.socket": other}) is None
    pair[0].settimeout(5)
    sink = sink_for({**GUNICORN, "gunicorn.socket": pair[0]})
    if GREENLETS:
        assert sink is not None and os_socket(pair[0]).gettimeout() == 0.0
    else:
        assert sink is None
    assert sink_for({**GUNICORN}) is None, "no socket in the environ"
