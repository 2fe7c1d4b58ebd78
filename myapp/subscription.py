"""One stream's place in the hub: its channels, its position and its bounded queue.

The hub hands every item for a stream (an event, a heartbeat, a reset) to
``Subscription.offer``, the one place that decides how it travels:

- the stream is *parked* (its greenlet waits in ``get`` with nothing queued
  and its socket is known): the item's bytes go straight to the socket with
  one non-blocking send (``myapp.sink``); what the socket does not take at
  once becomes the stream's *tail*, which unparks it and which it writes
  before anything else;
- otherwise the item's frame joins the queue, which holds at most
  ``queue_size`` live frames (plus the replay): one more closes the stream
  as too slow.

Items answer ``wire(sent, chunked)``: the bytes to write for a stream that
was handed position ``sent`` (None when there is nothing to write, e.g. an
event it already has) and its position afterwards. ``pos`` is the position
the client has once everything handed over is written, so duplicates are
dropped when offered and the queue holds nothing but frames to write.

Threads: under gunicorn's gevent worker the hub and every stream run in one
OS thread, and code that does not yield runs uninterrupted. Under
``runserver`` they are real threads: ``offer`` runs under the hub's lock,
passed in as ``lock``, and ``get`` parks and unparks under it.
"""

import json
import sys
import threading

from myapp import sse
from myapp.events import RESET_EVENT
from myapp.ids import format_id
from myapp.sink import chunk

__all__ = [
    "Subscription",
    "Heartbeat",
    "Reset",
    "HEARTBEAT",
    "POSITION_EVENT",
    "OVERFLOW",
    "SHUTDOWN",
    "GAP",
    "HUB_STOPPED",
    "UNSUBSCRIBED",
    "DISCONNECTED",
]

#: Reasons a subscription closes (``Subscription.closed``).
OVERFLOW = "overflow"  # the stream fell behind by more than its queue holds
SHUTDOWN = "shutdown"  # the worker is stopping (deploy)
GAP = "gap"  # events were lost before the hub could read them; the browser must resume
HUB_STOPPED = "hub stopped"
UNSUBSCRIBED = "unsubscribed"  # the stream itself left (its response ended)
DISCONNECTED = "disconnected"  # the client closed the connection, or a write found it gone

#: Event type of a heartbeat that moves the client's last event id. It has no
#: data, so browsers dispatch nothing (WHATWG HTML 9.2.6, "dispatch the
#: event" step 2) yet still set the last event ID (step 1); clients that
#: surface every block (httpx-sse and others) see a named event to ignore.
POSITION_EVENT = "stream.position"


def _patched_by_gevent():
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


#: True when threads are greenlets (gunicorn's gevent worker).
GREENLETS = _patched_by_gevent()

#: A heartbeat that moves nothing: a comment, which no listener sees.
HEARTBEAT = sse.comment()
_HEARTBEAT_CHUNK = chunk(HEARTBEAT)


class Heartbeat:
    """A queue item: write a heartbeat; ``pos`` is the hub's position when it was sent.

    Carries ``id: <pos>`` (as a ``stream.position`` block without data)
    only for a stream that has not sent ``pos`` yet, else it is a bare
    comment. Encoded once per heartbeat slice and shared.
    """

    __slots__ = ("pos", "frame", "chunk")

    def __init__(self, pos):
        self.pos = pos
        self.frame = sse.encode(event=POSITION_EVENT, id=format_id(pos))
        self.chunk = chunk(self.frame)

    def wire(self, sent, chunked):
        if self.pos > sent:
            return (self.chunk if chunked else self.frame), self.pos
        return (_HEARTBEAT_CHUNK if chunked else HEARTBEAT), sent


class Reset:
    """A queue item: the stream lost events it can never get (``reason``); go on from ``pos``.

    Written as a ``stream.reset`` event (data ``{"reason": ...}``, id
    ``pos``) whatever the stream has sent: the page reloads its state, and
    the stream skips everything at or before ``pos``.
    """

    __slots__ = ("reason", "pos", "frame", "chunk")

    def __init__(self, reason, pos):
        self.reason = reason
        self.pos = pos
        self.frame = sse.encode(json.dumps({"reason": reason}), event=RESET_EVENT, id=format_id(pos))
        self.chunk = chunk(self.frame)

    def wire(self, sent, chunked):
        return (self.chunk if chunked else self.frame), max(sent, self.pos)


class Subscription:
    """One stream's view of the hub.

    channels: tuple of channel names (str).
    owner: what the per-user stream limit counts (a user id), or None.
    queue_size: live frames the queue may hold before the stream is closed as
        too slow (int); the replay queued at the start does not count.
    lock: the hub's lock (``threading.Lock``), under which the hub offers
        items and under which ``get`` parks when threads are real.
    leave: ``leave(subscription, reason)``, the hub's way out (called by
        ``close``).

    ``start`` is the position the stream starts from (int) and ``reset``
    the reason it could not resume from its Last-Event-ID (a str), or None;
    both are set by ``begin`` before ``ready`` is set. ``pos`` is the
    position the client has once everything handed over is written (int).
    ``closed`` is None while open, else the reason (a str). ``direct`` is
    None, or the ``myapp.sink.Sink`` of the stream's socket once its response
    has started: the hub then writes to it while the stream waits in ``get``
    with nothing queued.
    """

    __slots__ = (
        "channels",
        "owner",
        "start",
        "reset",
        "closed",
        "pos",
        "direct",
        "ready",
        "slot",
        "_sink",
        "_tail",
        "_frames",
        "_wake",
        "_room",
        "_queue_size",
        "_lock",
        "_leave",
    )

    def __init__(self, channels, owner, *, queue_size, lock, leave):
        self.channels = channels
        self.owner = owner
        self.start = 0
        self.reset = None
        self.closed = None
        self.pos = 0
        self.direct = None
        self.ready = threading.Event()
        self.slot = None  # the hub's heartbeat slice, once active
        self._sink = None  # ``direct`` while parked in get(), else None
        self._tail = None  # bytes a direct write left unsent (framed for the wire)
        self._frames = []
        self._wake = threading.Event()
        self._room = queue_size
        self._queue_size = queue_size
        self._lock = lock
        self._leave = leave

    # -- the stream's side ----------------------------------------------------

    def get(self, timeout=None):
        """Return ``(tail, frames)``, waiting for something to write if there is nothing.

        tail: None, or bytes a direct write left unsent, already framed for
            the wire (one HTTP/1.1 chunk): write them first, straight to the
            socket.
        frames: list of SSE frames (bytes) to write after it, in order.

        timeout: seconds (float), or None to wait until something arrives or
        the subscription closes (heartbeats arrive every heartbeat interval).
        Returns ``(None, [])`` on timeout.

        With ``direct`` set, the wait parks the subscription: the hub writes
        to the socket itself meanwhile and wakes it only for a tail, a close
        or a full socket.
        """
        if not self._frames and self._tail is None and self.closed is None:
            sink = self.direct
            if sink is None or timeout == 0:
                self._wake.wait(timeout)
            elif GREENLETS:
                # One OS thread: the hub runs only while this greenlet waits.
                self._sink = sink
                try:
                    self._wake.wait(timeout)
                finally:
                    self._sink = None
            else:
                # Threads: park and unpark under the lock the hub offers under,
                # so a direct write never overlaps the stream's own writes.
                with self._lock:
                    if not self._frames and self._tail is None and self.closed is None:
                        self._sink = sink
                try:
                    self._wake.wait(timeout)
                finally:
                    with self._lock:
                        self._sink = None
        self._wake.clear()
        if GREENLETS:
            # One OS thread: nothing can run between these reads and writes.
            tail, frames = self._tail, self._frames
            self._tail, self._frames = None, []
        else:
            with self._lock:
                tail, frames = self._tail, self._frames
                self._tail, self._frames = None, []
        self._room = self._queue_size  # the replay's extra room is used up
        return tail, frames

    def close(self):
        """Leave the hub. Safe to call twice."""
        self._leave(self, UNSUBSCRIBED)

    # -- the hub's side (call with the hub's lock held) -------------------------

    def begin(self, start, reset, replay=()):
        """Start at position ``start`` (int), after ``reset`` (a reason, or None), with ``replay`` queued.

        replay: the ``myapp.events.Event`` objects after ``start`` the stream
        must send first, in ascending position; they do not count against the
        queue's size.
        """
        self.start = self.pos = start
        self.reset = reset
        frames = self._frames
        for event in replay:
            frames.append(event.frame)
            self.pos = event.pos
        self._room += len(replay)

    def offer(self, item):
        """Write ``item`` to the parked socket, or queue its frame; return None, or the reason to close.

        item: an ``myapp.events.Event``, ``Heartbeat`` or ``Reset``. An item
        with nothing new for this stream is dropped. A heartbeat for a stream
        that already has something to write is dropped too (the stream is
        awake, and a stalled one keeps one heartbeat, not many). Returns
        OVERFLOW when the queue is full and DISCONNECTED when the socket is
        gone.
        """
        sink = self._sink
        if sink is not None:
            wire, pos = item.wire(self.pos, sink.chunked)
            if wire is None:
                return None
            try:
                sent = sink.send(wire)
            except OSError:
                return DISCONNECTED
            self.pos = pos
            if sent < len(wire):
                self._sink = None
                self._tail = wire[sent:]
                self._wake.set()
            return None
        frames = self._frames
        if type(item) is Heartbeat and (frames or self._tail is not None):
            return None
        wire, pos = item.wire(self.pos, False)
        if wire is None:
            return None
        if len(frames) >= self._room:
            return OVERFLOW
        frames.append(wire)
        self.pos = pos
        self._wake.set()
        return None

    def end(self, reason):
        """Mark the subscription closed with ``reason`` and wake its stream (the hub's side of a close)."""
        self.closed = reason
        self.direct = self._sink = None
        self.ready.set()
        self._wake.set()
