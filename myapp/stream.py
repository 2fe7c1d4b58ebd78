"""One SSE stream: resume from Last-Event-ID, replay history, then go live.

Order of work, so that nothing is lost and nothing is sent twice:

1. read the broker's newest position (the start for a fresh connection);
2. subscribe through the hub and wait for the broker's confirmation;
3. read each channel's history after the start position;
4. send the replay, then the live events from the subscription's queue,
   dropping any event at or before the last position sent.

Events published after step 1 are either in the history read at step 3 or
arrive live after step 2, and every frame carries its position, so a stream
multiplexing several channels resumes all of them from one id.

Resets: a Last-Event-ID that is malformed, newer than the broker's newest
position, older than the history's time-to-live, or whose next events were
trimmed, cannot be resumed. The stream then sends one ``stream.reset`` event
(data: ``{"reason": ...}``, with a fresh id) telling the page to reload its
state, and goes on live from the newest position. Never a 400: a non-200
answer stops the browser for good (WHATWG HTML 9.2.3).

Positions: every stream starts with one ``stream.open`` event (data:
``{"channels": [...], "resumed": bool}``) or ``stream.reset`` event, whose id
is the position the stream starts from, so even a page that received nothing
yet reconnects without a gap. Heartbeats carry an id when the hub's position
moved: an id-only block dispatches no event, yet sets the browser's last
event ID (WHATWG HTML 9.2.6, "dispatch the event" step 1), so a reconnect
after a quiet hour resumes instead of resetting.
"""

import json
import random
import time

from myapp import sse
from myapp.events import OPEN_EVENT, RESET_EVENT
from myapp.ids import format_id, milliseconds, parse

__all__ = ["open_stream", "Stream", "HEARTBEAT"]

HEARTBEAT = sse.comment()


def open_stream(hub, channels, last_event_id=None, *, key=None, retry_ms=2000, lifetime=None):
    """Subscribe to ``channels`` and return the stream (a ``Stream``: an iterable of bytes).

    hub: the process's ``myapp.hub.Hub``.
    channels: channel names (tuple of str), already authorized.
    last_event_id: the client's Last-Event-ID (str) or None for a fresh stream.
    key: what the hub's per-user stream limit counts, or None.
    retry_ms: the base reconnection delay in milliseconds; each stream sends
        a value jittered between 1x and 2x so reconnects after a deploy spread.
    lifetime: seconds after which the stream ends (the browser reconnects and
        is authorized again), or None.

    Raise BrokerUnavailable (broker down) or TooManyStreams before anything
    is sent; the caller answers 503 or 429.
    """
    broker = hub.broker
    try:
        head = broker.last_position()
        subscription = hub.subscribe(channels, key=key)
        try:
            reset = None
            if last_event_id is None:
                start = head
            else:
                start = parse(last_event_id)
                if start is None:
                    reset = "malformed"
                elif start > head:
                    reset = "unknown"
                elif milliseconds(head) - milliseconds(start) > broker.history_ttl * 1000:
                    reset = "expired"
            if reset is not None:
                start = head
            history = broker.history(channels, start)
            if history.trimmed and reset is None:
                reset = "trimmed"
                start = head
                history = broker.history(channels, start)
        except BaseException:
            subscription.close()
            raise
    finally:
        broker.release()
    retry = random.randint(retry_ms, 2 * retry_ms)
    first = [sse.encode(comment="stream open", retry=retry)]
    if reset is not None:
        first.append(sse.encode(json.dumps({"reason": reset}), event=RESET_EVENT, id=format_id(start)))
    else:
        opened = {"channels": list(channels), "resumed": last_event_id is not None}
        first.append(sse.encode(json.dumps(opened), event=OPEN_EVENT, id=format_id(start)))
    return Stream(_frames(hub, subscription, start, first, history.events, retry, lifetime), subscription)


class Stream:
    """What the view hands to ``StreamingHttpResponse``.

    Iterating it runs the plain sync generator of frames. Django calls
    ``close()`` when the response ends, which leaves the hub even if the
    server never started iterating (so no subscription can leak).
    """

    __slots__ = ("_frames", "_subscription")

    def __init__(self, frames, subscription):
        self._frames = frames
        self._subscription = subscription

    def __iter__(self):
        return self._frames

    def close(self):
        self._frames.close()
        self._subscription.close()


def _frames(hub, subscription, pos, first, replay, retry, lifetime):
    """Yield the stream's frames; close the subscription when the response closes."""
    try:
        for event in replay:
            if event.pos > pos:
                first.append(event.frame)
                pos = event.pos
        yield b"".join(first)
        deadline = time.monotonic() + lifetime if lifetime else None
        # The hub's heartbeats wake us; if none comes within two intervals
        # the hub is gone and the stream must end rather than go silent.
        patience = 2 * hub.heartbeat_interval + 1
        while True:
            items = subscription.get(patience)
            out = []
            for item in items:
                if type(item) is int:  # a heartbeat carrying the hub's position
                    if item > pos:
                        pos = item
                        out.append(sse.encode(comment="", id=format_id(pos)))
                    else:
                        out.append(HEARTBEAT)
                elif item.pos > pos:
                    out.append(item.frame)
                    pos = item.pos
            if subscription.closed is not None:
                # End between two frames; the browser reconnects after
                # ``retry`` ms and resumes from its last event id.
                out.append(sse.encode(comment=f"closing: {subscription.closed}", retry=retry))
                yield b"".join(out)
                return
            if not items and hub.stopped:
                return
            if deadline is not None and time.monotonic() > deadline:
                out.append(sse.encode(comment="closing: lifetime", retry=retry))
                yield b"".join(out)
                return
            if out:
                yield b"".join(out)
            elif not items:
                yield HEARTBEAT
    finally:
        subscription.close()
