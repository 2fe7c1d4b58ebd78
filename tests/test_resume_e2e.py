"""No loss across reconnects on the real stack, over the Redis and PostgreSQL brokers.

Each test checks the exact sequence a client saw: every event once, in order.
"""

import json
import os
import signal
import socket
import time
import uuid

import pytest

from tests.conftest import wait_until
from tests.sse_client import SSEClient, SSEParser

pytestmark = pytest.mark.e2e


def room():
    return f"room:resume-{uuid.uuid4().hex[:10]}"


def stream_url(stack, channel):
    return f"{stack.url}/events/?channel={channel}"


def notes(client):
    return [json.loads(m.data) for m in client.messages if m.type == "note"]


def publish_many(stack, channel, values):
    for value in values:
        assert stack.publish(channel, value).status_code == 200


def test_reconnect_gets_exactly_the_missed_events_then_live_ones(stack):
    """Disconnect, N events published, reconnect with Last-Event-ID: exactly those N in order, then live."""
    session, channel = stack.login("alice"), room()
    first = SSEClient(session, stream_url(stack, channel))
    first.wait_count("stream.open", 1)
    publish_many(stack, channel, range(3))
    first.wait_count("note", 3)
    first.close()
    publish_many(stack, channel, range(3, 23))
    second = SSEClient(session, stream_url(stack, channel), last_event_id=first.last_event_id)
    try:
        second.wait_count("note", 20)
        publish_many(stack, channel, range(23, 25))
        second.wait_count("note", 22)
        assert json.loads(second.messages[0].data)["resumed"] is True
        assert notes(second) == list(range(3, 25))
    finally:
        second.close()


def test_first_connection_can_resume_from_a_query_parameter(stack):
    """?lastEventId= works like the header (first connections and polyfills cannot set the header)."""
    session, channel = stack.login("alice"), room()
    assert stack.publish(channel, "seen").status_code == 200
    seen_id = stack.publish(channel, "seen too").json()["id"]
    publish_many(stack, channel, ["missed"])
    client = SSEClient(session, f"{stream_url(stack, channel)}&lastEventId={seen_id}")
    try:
        client.wait_count("note", 1)
        assert notes(client) == ["missed"]
    finally:
        client.close()


def test_a_fresh_stream_that_saw_nothing_still_resumes_without_loss(stack):
    """The stream.open id lets a client that received no event yet reconnect without a gap."""
    session, channel = stack.login("alice"), room()
    first = SSEClient(session, stream_url(stack, channel))
    first.wait_count("stream.open", 1)
    first.close()
    publish_many(stack, channel, ["while away"])
    second = SSEClient(session, stream_url(stack, channel), last_event_id=first.last_event_id)
    try:
        second.wait_count("note", 1)
        assert notes(second) == ["while away"]
    finally:
        second.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["deploy (SIGTERM)", "crash (SIGKILL)"])
def test_resume_after_the_serving_worker_dies(stack, sig):
    """When the worker holding a stream stops, the client resumes on another worker without loss."""
    session, channel = stack.login("alice"), room()
    first = SSEClient(session, stream_url(stack, channel))
    try:
        first.wait_count("stream.open", 1)
        publish_many(stack, channel, range(2))
        first.wait_count("note", 2)
        started = time.monotonic()
        os.kill(stack.serving_worker(first), sig)
        first.wait_end(timeout=8)
        ended_after = time.monotonic() - started
        if sig == signal.SIGTERM:
            assert ended_after < 3, "streams end at once on SIGTERM, well inside graceful_timeout (10 s)"
            assert first.parser.comments[-1] == "closing: shutdown"
        publish_many(stack, channel, range(2, 12))
        second = SSEClient(session, stream_url(stack, channel), last_event_id=first.last_event_id)
        try:
            second.wait_count("note", 10)
            assert notes(first) + notes(second) == list(range(12))
        finally:
            second.close()
    finally:
        first.close()
        stack.wait_ready()


def test_slow_client_is_cut_off_and_recovers_everything(stack):
    """A client that stops reading is disconnected (bounded memory); its reconnect replays the rest."""
    session, channel = stack.login("alice"), room()
    fast = SSEClient(session, stream_url(stack, channel))
    fast.wait_count("stream.open", 1)
    cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
    slow = socket.create_connection(("127.0.0.1", stack.port))
    slow.sendall(
        f"GET /events/?channel={channel} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    slow.settimeout(10)
    received = slow.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    while b"stream.open" not in received:
        received += slow.recv(65536)

    # About 9.6 MB: more than the socket buffers hold (loopback send buffers grow to 4 MB).
    values = [f"{n:04d}-" + "x" * 48000 for n in range(200)]
    publish_many(stack, channel, values)
    fast.wait_count("note", 200, timeout=60)
    assert notes(fast) == values, "a slow neighbour does not disturb other streams"

    # Not reading: the server gives up on the connection after its send timeout (3 s here).
    local_port = slow.getsockname()[1]
    wait_until(lambda: not holds(stack, local_port), timeout=30, what="the server to drop the slow client")
    slow.settimeout(20)
    chunks = [received]
    try:
        while chunk := slow.recv(65536):  # what reached this side before the server gave up
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    slow.close()
    body = b"".join(chunks).split(b"\r\n\r\n", 1)[1]
    parser = SSEParser()
    got = [json.loads(m.data) for m in parser.feed(dechunk(body)) if m.type == "note"]
    assert len(got) < 200, "the slow client was cut off before receiving everything"
    resumed = SSEClient(session, stream_url(stack, channel), last_event_id=parser.last_event_id)
    try:
        resumed.wait_count("note", 200 - len(got), timeout=60)
        assert got + notes(resumed) == values
    finally:
        resumed.close()
        fast.close()


def holds(stack, local_port):
    """True while a gunicorn worker still has the connection from ``local_port``."""
    import psutil

    return any(
        connection.raddr and connection.raddr.port == local_port
        for pid in stack.worker_pids()
        for connection in psutil.Process(pid).net_connections(kind="tcp")
    )


def dechunk(body):
    """Decode an HTTP/1.1 chunked body, keeping a truncated last chunk's bytes."""
    out, position = [], 0
    while position < len(body):
        end = body.find(b"\r\n", position)
        if end == -1:
            break
        size = int(body[position:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(body[end + 2 : end + 2 + size])
        position = end + 2 + size + 2
    return b"".join(out)
