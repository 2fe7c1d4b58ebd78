"""A client that closes its connection frees its stream at once (myapp.hangups), on the real stack.

The stack has 15 s heartbeats, so a closed stream cannot be found by a
failing heartbeat write within these tests' deadlines: only the hang-up
watch can free it that fast.
"""

import socket
import time

import psutil
import pytest
import requests

from tests.conftest import wait_until
from tests.stack import LiveStack

pytestmark = pytest.mark.e2e

#: Streams one user may hold in the test stack's (single) worker.
LIMIT = 3


@pytest.fixture(scope="module")
def quiet_stack(tmp_path_factory, valkey_server):
    """One gevent worker, 15 s heartbeats, at most LIMIT streams per user."""
    stack = LiveStack(
        tmp_path_factory.mktemp("stack-hangups"),
        mode="redis",
        redis_url=valkey_server.url,
        workers=1,
        heartbeat=15.0,
        env={"MYAPP_MAX_STREAMS_PER_USER": str(LIMIT)},
    )
    with stack:
        yield stack


class RawStream:
    """A stream read over a plain socket, so the test decides exactly when and how it closes."""

    def __init__(self, stack, session, path="/events/"):
        cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
        self.sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\nAccept: text/event-stream\r\n\r\n"
        self.sock.sendall(request.encode())
        self.local_port = self.sock.getsockname()[1]
        self.received = b""
        while b"stream.open" not in self.received and b"\r\n\r\n{" not in self.received:
            data = self.sock.recv(65536)
            if not data:
                break
            self.received += data
        self.status = int(self.received.split(b" ", 2)[1])

    def close(self):
        self.sock.close()
        return time.monotonic()


def _server_side(stack, port):
    """The worker's end of the connection from client ``port`` (a psutil connection), or None once it is gone."""
    for pid in stack.worker_pids():
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.raddr and connection.raddr.port == port:
                return connection
    return None


def _streams(stack):
    return requests.get(stack.url + "/healthz", timeout=5).json()["streams"]


def test_a_user_reopening_pages_is_never_refused(quiet_stack):
    """Ten pages opened and left one after another, LIMIT streams allowed: every stream opens (200, never 429)."""
    session = quiet_stack.login("alice")
    statuses = []
    for _ in range(10):
        stream = RawStream(quiet_stack, session)
        statuses.append(stream.status)
        stream.close()
        wait_until(lambda port=stream.local_port: _server_side(quiet_stack, port) is None, timeout=2, what="the slot")
    assert statuses == [200] * 10


def test_closed_streams_are_freed_within_a_fraction_of_a_second(quiet_stack):
    """Idle streams whose clients close: the socket (no CLOSE_WAIT), the subscription and the greenlet go at once."""
    session = quiet_stack.login("bob")
    before = _streams(quiet_stack)
    streams = [RawStream(quiet_stack, session) for _ in range(LIMIT)]
    assert [stream.status for stream in streams] == [200] * LIMIT
    wait_until(lambda: _streams(quiet_stack) == before + LIMIT, what="the streams to be counted")
    freed_in = []
    for stream in streams:
        closed_at = stream.close()
        wait_until(lambda port=stream.local_port: _server_side(quiet_stack, port) is None, timeout=2, what="the socket")
        freed_in.append(time.monotonic() - closed_at)
    wait_until(lambda: _streams(quiet_stack) == before, timeout=2, what="the hub to drop the streams")
    worker = psutil.Process(quiet_stack.worker_pids()[0])
    assert not [c for c in worker.net_connections(kind="tcp") if c.status == psutil.CONN_CLOSE_WAIT]
    print(f"client close -> server socket gone: max {max(freed_in) * 1000:.1f} ms over {len(freed_in)} streams")


def test_busy_stream_closed_by_its_client_is_freed(quiet_stack):
    """A client that stops reading a stream flooded with events, then closes it: the server frees it at once."""
    session = quiet_stack.login("carol")
    stream = RawStream(quiet_stack, session)
    channel = _own_channel(quiet_stack, session)
    payload = "x" * 60_000
    for n in range(40):  # about 2.4 MB: more than the socket buffers hold
        assert quiet_stack.publish(channel, f"{n}:{payload}").status_code == 200
    closed_at = stream.close()  # unread data in the receive buffer: the kernel sends an RST
    wait_until(lambda: _server_side(quiet_stack, stream.local_port) is None, timeout=2, what="the socket")
    print(f"busy stream: client close -> server socket gone in {(time.monotonic() - closed_at) * 1000:.1f} ms")
    again = RawStream(quiet_stack, session)
    again.close()
    assert again.status == 200


def _own_channel(stack, session):
    """The logged-in user's own channel, as its stream would open it."""
    (channel,) = session.get(stack.url + "/events/?check=1", timeout=5).json()["channels"]
    return channel


def test_a_burst_from_one_session_opens_exactly_the_limit_and_leaks_no_slot(quiet_stack):
    """30 stream requests at once from one session: LIMIT open, the rest 429; once closed, the slots are free again."""
    session = quiet_stack.login("alice")
    cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
    request = f"GET /events/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", quiet_stack.port), timeout=10) for _ in range(30)]
    for sock in socks:
        sock.sendall(request)
    statuses = sorted(int(sock.recv(64).split(b" ", 2)[1]) for sock in socks)
    for sock in socks:
        sock.close()
    assert statuses == [200] * LIMIT + [429] * (30 - LIMIT)
    wait_until(lambda: _streams(quiet_stack) == 0, timeout=2, what="the streams to be freed")
    again = [RawStream(quiet_stack, session) for _ in range(LIMIT)]
    for stream in again:
        stream.close()
    assert [stream.status for stream in again] == [200] * LIMIT, "every slot came back"
