"""What the hub hands a stream besides events, and the reasons a stream closes.

``Heartbeat`` and ``Reset`` answer ``wire(sent, chunked)`` like
``myapp.events.Event`` (see ``myapp.subscription``); ``closing_frame`` is a
stream's last block. Each is encoded once and shared by every stream it goes
to (WHATWG HTML 9.2.6 for the blocks).
"""

import json

from myapp import sse
from myapp.events import RESET_EVENT
from myapp.ids import format_id
from myapp.sink import chunk

__all__ = [
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

#: Reasons a subscription closes (``Subscription.closed``).
OVERFLOW = "overflow"  # the stream fell behind by more than its queue holds
SHUTDOWN = "shutdown"  # the worker is stopping (deploy)
GAP = "gap"  # events were lost before the hub could read them; the browser must resume
HUB_STOPPED = "hub stopped"
UNSUBSCRIBED = "unsubscribed"  # the stream itself left (its response ended)
DISCONNECTED = "disconnected"  # the client closed the connection, or a write found it gone
LIFETIME = "lifetime"  # MYAPP_STREAM_LIFETIME_SECONDS passed: the browser reconnects and is authorized again
DISCONNECT = "disconnect"  # myapp.control.disconnect(user): the page stops listening
UNSUBSCRIBE = "unsubscribe"  # myapp.control.unsubscribe(user, channel): the page reconnects, authorized again

#: Event type of the last event of a stream a control message ended (data
#: ``{"reason": "disconnect" | "unsubscribe", "reconnect": bool}``): push.js
#: stops for good when ``reconnect`` is false.
END_EVENT = "stream.end"

#: What ``offer`` returns for an owned stream whose socket is full: the hub
#: then waits for it to be writable and calls ``flush``.
BACKLOGGED = "backlogged"

#: Event type of every block the service sends that is no event for the page:
#: heartbeats and the end of a stream. The block has no data, so browsers
#: dispatch nothing (WHATWG HTML 9.2.6, "dispatch the event" step 2), yet an
#: ``id:`` in it still sets their last event ID (step 1); clients that turn
#: every block into an event (httpx-sse and others, which also repeat the
#: last id on a bare comment block) see a named event they can ignore.
POSITION_EVENT = "stream.position"


#: A heartbeat that moves nothing: a ``stream.position`` block without id or data.
HEARTBEAT = sse.encode(event=POSITION_EVENT)
_HEARTBEAT_CHUNK = chunk(HEARTBEAT)


def closing_frame(reason, retry):
    """The last block of a stream that ends for ``reason`` (str), with the ``retry`` (ms, or None).

    A comment ``closing: <reason>`` in a data-less block (the browser
    reconnects and resumes), except after a control message: then a
    ``stream.end`` event the page script acts on.
    """
    if reason in (DISCONNECT, UNSUBSCRIBE):
        data = json.dumps({"reason": reason, "reconnect": reason == UNSUBSCRIBE})
        return sse.encode(data, comment=f"closing: {reason}", event=END_EVENT, retry=retry)
    return sse.encode(comment=f"closing: {reason}", event=POSITION_EVENT, retry=retry)


class Heartbeat:
    """A queue item: write a heartbeat; ``pos`` is the hub's position when it was sent.

    A ``stream.position`` block without data, with ``id: <pos>`` only for a
    stream that has not been handed ``pos`` yet (an id never moves back).
    Encoded once per heartbeat slice (and partition) and shared. ``id``
    (str) replaces ``format_id(pos)`` (``MultiSubscription``'s own ids).
    """

    __slots__ = ("pos", "frame", "chunk")

    def __init__(self, pos, id=None):
        self.pos = pos
        self.frame = sse.encode(event=POSITION_EVENT, id=format_id(pos) if id is None else id)
        self.chunk = chunk(self.frame)

    def wire(self, sent, chunked):
        if self.pos > sent:
            return (self.chunk if chunked else self.frame), self.pos
        return (_HEARTBEAT_CHUNK if chunked else HEARTBEAT), sent


class Reset:
    """A queue item: the stream lost events it can never get (``reason``); go on from ``pos``.

    Written as a ``stream.reset`` event (data ``{"reason": ...}``, id
    ``pos``) whatever the stream has sent: the page reloads its state, and
    the stream skips everything at or before ``pos``. ``backwards`` lets
    ``pos`` move the stream's position down (the broker's order went back,
    see ``myapp.hub.Hub._check_order``); otherwise it never moves down.
    ``part`` is the broker partition of ``pos`` (0 with a single-order
    broker); ``id`` (str) replaces ``format_id(pos)``.
    """

    __slots__ = ("reason", "pos", "frame", "chunk", "backwards", "part")

    def __init__(self, reason, pos, *, backwards=False, part=0, id=None):
        self.reason = reason
        self.pos = pos
        self.backwards = backwards
        self.part = part
        wire_id = format_id(pos) if id is None else id
        self.frame = sse.encode(json.dumps({"reason": reason}), event=RESET_EVENT, id=wire_id)
        self.chunk = chunk(self.frame)

    def wire(self, sent, chunked):
        return (self.chunk if chunked else self.frame), (self.pos if self.backwards else max(sent, self.pos))
