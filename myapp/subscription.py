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

A stream whose connection the hub *owns* (adopted from gunicorn, see
``myapp.adoption``) has no greenlet at all: every offer is a direct write,
and what the socket does not take waits in the tail and the queue until the
socket is writable again (``flush``, called by the hub).

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

import sys
import threading

from myapp.counters import Counters
from myapp.events import Event
from myapp.ids import format_id
from myapp.items import (  # noqa: F401 - re-exported: the hub and views import them from here
    BACKLOGGED,
    DISCONNECT,
    DISCONNECTED,
    END_EVENT,
    GAP,
    HEARTBEAT,
    HUB_STOPPED,
    LIFETIME,
    OVERFLOW,
    POSITION_EVENT,
    SHUTDOWN,
    UNSUBSCRIBE,
    UNSUBSCRIBED,
    Heartbeat,
    Reset,
    closing_frame,
)
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
    "LIFETIME",
    "DISCONNECT",
    "UNSUBSCRIBE",
    "END_EVENT",
    "BACKLOGGED",
    "closing_frame",
]


def _patched_by_gevent():
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


#: True when threads are greenlets (gunicorn's gevent worker).
GREENLETS = _patched_by_gevent()


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
    counters: the hub's ``myapp.counters.Counters``, where ``offer`` counts
        the events it writes or queues (None: counters of its own).
    part: the broker partition all ``channels`` belong to (int, 0 with a
        single-order broker); ``parts`` is ``(part,)``. A stream whose
        channels span partitions is a ``myapp.partitions.MultiSubscription``.

    ``start`` is the position the stream starts from (int) and ``reset``
    the reason it could not resume from its Last-Event-ID (a str), or None;
    both are set by ``begin`` before ``ready`` is set. ``pos`` is the
    position the client has once everything handed over is written (int).
    ``closed`` is None while open, else the reason (a str). ``direct`` is
    None, or the ``myapp.sink.Sink`` of the stream's socket once its response
    has started: the hub then writes to it while the stream waits in ``get``
    with nothing queued. ``owned`` is True once the hub owns the connection
    (``adopt``). ``deadline`` is the ``time.monotonic()`` after which the
    stream ends (its lifetime), or None.
    """

    __slots__ = (
        "channels",
        "part",
        "parts",
        "owner",
        "start",
        "reset",
        "closed",
        "pos",
        "direct",
        "ready",
        "slot",
        "owned",
        "deadline",
        "retry",
        "backlog_since",
        "fresh",
        "on_end",
        "_sink",
        "_tail",
        "_frames",
        "_wake",
        "_room",
        "_queue_size",
        "_lock",
        "_leave",
        "_counters",
    )

    def __init__(self, channels, owner, *, queue_size, lock, leave, counters=None, part=0):
        self.channels = channels
        self.part = part
        self.parts = (part,)
        self.owner = owner
        self.start = 0
        self.reset = None
        self.closed = None
        self.pos = 0
        self.direct = None
        self.ready = threading.Event()
        self.slot = None  # the hub's heartbeat slice, once active
        self.owned = False
        self.deadline = None
        self.retry = None  # milliseconds, sent in the last block of an owned stream
        self.backlog_since = None  # time.monotonic() since an owned stream's socket has been full
        self.on_end = None  # called (no arguments) by the hub once an owned stream has ended
        self.fresh = False  # handed an event since its last heartbeat turn (the hub skips that heartbeat)
        self._sink = None  # ``direct`` while parked in get(), else None
        self._tail = None  # bytes a direct write left unsent (framed for the wire)
        self._frames = []
        self._wake = threading.Event()
        self._room = queue_size
        self._queue_size = queue_size
        self._lock = lock
        self._leave = leave
        self._counters = Counters() if counters is None else counters

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

    def close(self, reason=UNSUBSCRIBED):
        """Leave the hub, closed with ``reason`` (one of the reasons above). Safe to call twice."""
        self._leave(self, reason)

    @property
    def start_id(self):
        """The id (str) of the position the stream starts from (its first block's id)."""
        return format_id(self.start)

    # -- the hub's side (call with the hub's lock held) -------------------------

    def cursor(self, positions):
        """The start ``begin`` takes for a stream starting at ``positions`` (the hub's, one per partition)."""
        return positions[self.part]

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
        if sink is not None and self._tail is None:
            wire, pos = item.wire(self.pos, sink.chunked)
            if wire is None:
                return None
            try:
                sent = sink.send(wire)
            except OSError:
                return DISCONNECTED
            self.pos = pos
            self.fresh = True
            if type(item) is Event:
                self._counters.direct += 1
            if sent < len(wire):
                self._tail = wire[sent:]
                if self.owned:
                    return BACKLOGGED
                self._sink = None
                self._wake.set()
            return None
        frames = self._frames
        if type(item) is Heartbeat and (frames or self._tail is not None):
            return None
        # An owned stream's queue holds bytes for its socket as they are.
        wire, pos = item.wire(self.pos, self.owned and sink.chunked)
        if wire is None:
            return None
        if len(frames) >= self._room:
            return OVERFLOW
        frames.append(wire)
        self.pos = pos
        self.fresh = True
        if type(item) is Event:
            self._counters.queued += 1
        if not self.owned:
            self._wake.set()
        return None

    def adopt(self, sink, *, retry=None, deadline=None):
        """Make the hub the owner of the connection (call with the lock held); return BACKLOGGED or None.

        sink: a ``myapp.sink.Sink`` on the connection (``chunked`` if the
            response head announced the chunked coding).
        retry: the reconnection delay (milliseconds) for the last block.
        deadline: ``time.monotonic()`` after which the stream ends, or None.

        Whatever was queued meanwhile is written now; BACKLOGGED means the
        socket did not take it all.
        """
        self.owned = True
        self.direct = self._sink = sink
        self.retry = retry
        self.deadline = deadline
        if self._frames:
            queued = b"".join(self._frames)
            self._tail = chunk(queued) if sink.chunked else queued
            self._frames = []
        self._room = self._queue_size
        return self.flush()

    def flush(self):
        """Write an owned stream's tail and queue to its socket (call with the lock held).

        Return None when everything left, BACKLOGGED when the socket is full
        again, or DISCONNECTED when the connection is gone.
        """
        data = self._tail
        if self._frames:
            data = (data or b"") + b"".join(self._frames)
            self._frames = []
        self._tail = None
        if not data:
            self.backlog_since = None
            return None
        try:
            sent = self._sink.send(data)
        except OSError:
            return DISCONNECTED
        if sent < len(data):
            self._tail = data[sent:]
            return BACKLOGGED
        self.backlog_since = None
        return None

    def last_words(self, frame):
        """End an owned stream's response with ``frame`` (bytes) if nothing waits before it; never blocks.

        With the chunked coding the response's last chunk follows (RFC 9112
        section 7.1), so the client sees the response end cleanly.
        """
        sink = self._sink
        if self._tail is None and not self._frames and sink is not None:
            try:
                sink.send(chunk(frame) + b"0\r\n\r\n" if sink.chunked else frame)
            except OSError:
                pass

    def end(self, reason):
        """Mark the subscription closed with ``reason`` and wake its stream (the hub's side of a close).

        Return the sink of an owned stream (the hub closes its socket), else None.
        """
        self.closed = reason
        sink = None
        if self.owned:
            sink = self._sink
            self._tail = None
            self._frames = []
        self.direct = self._sink = None
        self.ready.set()
        self._wake.set()
        return sink
