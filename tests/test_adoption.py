"""Adopted streams (myapp.adoption) on the real stack: the hub owns the connection, the bytes stay exact.

gunicorn with one gevent worker and myapp.gunicorn's hooks; streams read
over plain sockets so the test sees every byte, the chunk framing included.
"""

import json
import socket
import time

import pytest
import requests

from myapp.brokers.redis import RedisBroker
from myapp.ids import format_id, parse
from tests.conftest import wait_until
from tests.sse_client import ChunkedDecoder, SSEParser
from tests.stack import LiveStack

pytestmark = pytest.mark.e2e

#: Seconds an adopted stream lives in this stack before it ends ("closing: lifetime").
LIFETIME = 8


@pytest.fixture(scope="module")
def adopting_stack(tmp_path_factory, valkey_server):
    """One gevent worker, 0.5 s heartbeats, streams end after LIFETIME seconds, queues of 100 frames."""
    stack = LiveStack(
        tmp_path_factory.mktemp("stack-adoption"),
        mode="redis",
        redis_url=valkey_server.url,
        workers=1,
        heartbeat=0.5,
        env={"MYAPP_STREAM_LIFETIME_SECONDS": str(LIFETIME)},
    )
    with stack:
        yield stack


class Wire:
    """A stream read byte for byte: the response head, then the body through a strict chunked decoder."""

    def __init__(self, stack, session, *, protocol="HTTP/1.1", rcvbuf=None, last_event_id=None):
        cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", stack.port))
        self.sock.sendall(f"GET /events/ {protocol}\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\n{resume}\r\n".encode())
        self.chunked = protocol == "HTTP/1.1"
        self.decoder = ChunkedDecoder()
        self.parser = SSEParser()
        self.messages = []
        self.body = b""
        self.eof = False
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += self.sock.recv(65536)
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = lines[0]
        self.headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
        self._take(rest)

    def _take(self, data):
        body = self.decoder.feed(data) if self.chunked else data
        self.body += body
        self.messages.extend(self.parser.feed(body))

    def read_until(self, predicate, timeout=10, what="messages"):
        deadline = time.monotonic() + timeout
        while not predicate(self):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.messages[-5:]}"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""  # dropped with bytes still unsent: the same to a browser (it reconnects)
            if not data:
                self.eof = True
                return
            self._take(data)

    def data(self, event_type="note"):
        return [m.data for m in self.messages if m.type == event_type]

    def close(self):
        self.sock.close()


def _health(stack):
    return requests.get(stack.url + "/healthz", timeout=5).json()


def _channel(stack, session):
    (channel,) = session.get(stack.url + "/events/?check=1", timeout=5).json()["channels"]
    return channel


def test_streams_are_adopted_by_the_hub(adopting_stack):
    """Each stream's connection is the hub's: /healthz counts it as adopted; its head says chunked and close."""
    session = adopting_stack.login("alice")
    wires = [Wire(adopting_stack, session) for _ in range(3)]
    try:
        for wire in wires:
            wire.read_until(lambda w: w.messages, what="stream.open")
            assert wire.status == "HTTP/1.1 200 OK"
            assert wire.headers["content-type"] == "text/event-stream"
            assert wire.headers["transfer-encoding"] == "chunked" and wire.headers["connection"] == "close"
            assert wire.messages[0].type == "stream.open"
        wait_until(lambda: _health(adopting_stack)["adopted"] == 3, what="three adopted streams")
        assert _health(adopting_stack)["streams"] == 3
    finally:
        for wire in wires:
            wire.close()
    wait_until(lambda: _health(adopting_stack)["streams"] == 0, timeout=2, what="the hub to let go")
    assert _health(adopting_stack)["adopted"] == 0


def test_adopted_stream_delivers_exact_frames_in_order(adopting_stack):
    """Events with every line ending reach an adopted stream once each, in order, in whole chunks."""
    session = adopting_stack.login("bob")
    wire = Wire(adopting_stack, session)
    try:
        channel = _channel(adopting_stack, session)
        values = [f"line {n}\r\nnext\rlast\n" for n in range(30)]
        ids = [adopting_stack.publish(channel, value, raw=True).json()["id"] for value in values]
        wire.read_until(lambda w: len(w.data()) == 30, what="30 events")
        assert wire.data() == [value.replace("\r\n", "\n").replace("\r", "\n") for value in values]
        assert [m.last_event_id for m in wire.messages if m.type == "note"] == ids
        assert wire.decoder.buffer == b"", "no half chunk"
    finally:
        wire.close()


def test_adopted_stream_ends_cleanly_at_its_lifetime(adopting_stack):
    """At the end of its lifetime the hub writes the closing block with a retry, then the last chunk, and closes."""
    session = adopting_stack.login("carol")
    wire = Wire(adopting_stack, session)
    try:
        wire.read_until(lambda w: w.eof, timeout=LIFETIME + 5, what="the end of the response")
        assert wire.decoder.ended, "the response ended with its last chunk"
        assert wire.parser.comments[-1] == "closing: lifetime"
        assert wire.parser.retry is not None
    finally:
        wire.close()


def test_slow_reader_gets_every_event_once_after_the_socket_drains(adopting_stack):
    """A client that stops reading: the hub keeps the backlog, and writes it all, in order, when it reads again."""
    session = adopting_stack.login("alice")
    wire = Wire(adopting_stack, session, rcvbuf=4096)
    try:
        channel = _channel(adopting_stack, session)
        payload = "x" * 3000
        for n in range(60):  # about 180 KB: more than the socket buffers hold, fewer frames than the queue
            assert adopting_stack.publish(channel, f"{n}:{payload}").status_code == 200
        wire.read_until(lambda w: len(w.data()) == 60, timeout=20, what="all 60 events")
        assert [json.loads(data).split(":")[0] for data in wire.data()] == [str(n) for n in range(60)]
        after = adopting_stack.publish(channel, "after").json()["id"]
        wire.read_until(lambda w: w.messages[-1].last_event_id == after, what="a live event once caught up")
        assert wire.decoder.buffer == b""
    finally:
        wire.close()


def test_overflowing_reader_is_dropped_and_resumes_from_history(adopting_stack):
    """A client too slow for its queue loses its connection (no last chunk); its reconnect resumes every event."""
    session = adopting_stack.login("bob")
    wire = Wire(adopting_stack, session, rcvbuf=4096)
    channel = _channel(adopting_stack, session)
    payload = "y" * 40_000
    # About 12 MB, published straight to the broker (fast): more than the kernel's socket buffers take
    # (tcp_wmem tops out at 4 MB), so the frames queue up, past the stack's queue of 100.
    broker = RedisBroker(url=adopting_stack.env["REDIS_URL"])
    try:
        ids = [format_id(broker.publish(channel, "note", f'"{n}:{payload}"')) for n in range(300)]
    finally:
        broker.close()
    wire.read_until(lambda w: w.eof, timeout=20, what="the server to drop the stream")
    wire.close()
    assert not wire.decoder.ended, "cut, not ended: the browser reconnects"
    last = wire.parser.last_event_id
    assert parse(last) < parse(ids[-1])
    again = Wire(adopting_stack, session, last_event_id=last)
    try:
        again.read_until(lambda w: w.messages and w.messages[-1].last_event_id == ids[-1], timeout=20, what="the rest")
        missed = [event_id for event_id in ids if parse(event_id) > parse(last)]
        assert [m.last_event_id for m in again.messages if m.type == "note"] == missed, "each missed event once"
    finally:
        again.close()


def test_http_1_0_stream_is_raw_bytes_ended_by_the_close(adopting_stack):
    """An HTTP/1.0 client gets the frames without chunk framing; the stream still carries live events."""
    session = adopting_stack.login("carol")
    wire = Wire(adopting_stack, session, protocol="HTTP/1.0")
    try:
        assert wire.status.startswith("HTTP/1.0 200") and "transfer-encoding" not in wire.headers
        wire.read_until(lambda w: w.messages, what="stream.open")
        event_id = adopting_stack.publish(_channel(adopting_stack, session), "plain").json()["id"]
        wire.read_until(lambda w: w.data() == ['"plain"'], what="the event")
        assert wire.messages[-1].last_event_id == event_id
    finally:
        wire.close()
