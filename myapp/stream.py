"""One SSE stream: resume from Last-Event-ID, replay history, then go live.

The hub does the broker work (``myapp.hub.Hub.subscribe``): it waits for the
broker's confirmation, reads the history after the stream's start position,
queues that replay, and only then queues live events. The stream sends the
queue in order and drops any event at or before the last position it sent, so
nothing is lost and nothing is sent twice; as every frame carries its
position, a stream multiplexing several channels resumes all of them from one
id.

A fresh stream (no Last-Event-ID) starts at the broker's newest position, or,
on channels the hub already holds, at the hub's position (the last event it
dispatched): then events published a moment before it connected may still
reach it; none published after it connected is missed.

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
from myapp.hub import DISCONNECTED, Heartbeat, Tail
from myapp.ids import format_id

__all__ = ["open_stream", "Stream"]


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
    subscription = hub.subscribe(channels, last_event_id=last_event_id, key=key)
    retry = random.randint(retry_ms, 2 * retry_ms)
    first = [sse.encode(comment="stream open", retry=retry)]
    start = format_id(subscription.start)
    if subscription.reset is not None:
        first.append(sse.encode(json.dumps({"reason": subscription.reset}), event=RESET_EVENT, id=start))
    else:
        opened = {"channels": list(channels), "resumed": last_event_id is not None}
        first.append(sse.encode(json.dumps(opened), event=OPEN_EVENT, id=start))
    return Stream(subscription, first, retry, lifetime)


class Stream:
    """What the view hands to ``StreamingHttpResponse``.

    Iterating it runs the plain sync generator of frames: ``first`` (list of
    bytes frames) at once, then the subscription's items; ``retry`` is the
    reconnection delay (milliseconds) sent when the stream ends, ``lifetime``
    the seconds after which it ends, or None. Django calls ``close()`` when
    the response ends, which leaves the hub even if the server never started
    iterating (so no subscription can leak).
    """

    __slots__ = ("_frames", "_subscription", "_sink", "_response", "_request")

    def __init__(self, subscription, first, retry, lifetime):
        self._subscription = subscription
        self._sink = None
        self._response = None
        self._request = None
        self._frames = _frames(self, first, retry, lifetime)

    def attach(self, response, *, sink=None, request=None):
        """Tell the stream about its response, before it starts.

        response: the ``StreamingHttpResponse`` carrying this stream.
        sink: a ``myapp.sink.Sink`` the hub may write to once the response
            has started, or None. If a middleware gave the response a
            ``Content-Encoding`` (compression rewrites the body), direct
            writes stay off.
        request: the Django request, or None. Once the response has started
            (every middleware is done with it), the stream releases what the
            request carries (session, user, messages, parsed query, ...) and
            keeps only ``environ``/``META``, ``path``, ``path_info`` and
            ``method``: otherwise that state, and the reference cycles Django
            builds around it, would live as long as the stream.
        """
        self._sink = sink
        self._response = response
        self._request = request

    def __iter__(self):
        return self._frames

    def close(self):
        self._frames.close()
        self._subscription.close()

    def _started(self):
        """Release the request; return the sink to enable now that the first frame has left, or None."""
        sink, response, request = self._sink, self._response, self._request
        self._response = self._request = None
        if request is not None:
            state = request.__dict__
            kept = {name: state[name] for name in _KEPT_REQUEST_STATE if name in state}
            state.clear()
            state.update(kept)
        if sink is None or response is None or response.has_header("Content-Encoding"):
            return None
        return sink


#: What a streaming request keeps once its response has started.
_KEPT_REQUEST_STATE = ("environ", "META", "path", "path_info", "method")


def _frames(stream, first, retry, lifetime):
    """Yield the first frame, then each burst of queued items in one write; drop what was sent already."""
    subscription = stream._subscription
    deadline = time.monotonic() + lifetime if lifetime else None
    out = first
    wait = 0  # the first frame and the replay leave at once, so headers do too
    try:
        while True:
            # The hub's heartbeats wake this at least every heartbeat interval;
            # closing the subscription (overflow, shutdown, hub death) wakes it too.
            for item in subscription.get(wait):
                kind = type(item)
                if kind is Tail:
                    # The rest of a direct write: it goes out before anything
                    # else, as it is (already framed for the wire).
                    try:
                        stream._sink.sendall(item.data)
                    except OSError:
                        return
                elif kind is Heartbeat:
                    frame, subscription.pos = item.wire(subscription.pos, chunked=False)
                    out.append(frame)
                elif item.pos > subscription.pos:
                    out.append(item.frame)
                    subscription.pos = item.pos
            closed = subscription.closed
            if closed is not None:
                if closed == DISCONNECTED:
                    return
                # End between two frames; the browser reconnects after
                # ``retry`` ms and resumes from its last event id.
                out.append(sse.encode(comment=f"closing: {closed}", retry=retry))
                yield b"".join(out)
                return
            if deadline is not None and time.monotonic() > deadline:
                out.append(sse.encode(comment="closing: lifetime", retry=retry))
                yield b"".join(out)
                return
            if out:
                yield b"".join(out)
                out = []
            if wait == 0:
                # The server has written the headers and the first frame: from
                # now on the hub may write to the socket while this waits.
                sink = stream._started()
                if subscription.closed is None:
                    subscription.direct = sink
                wait = None
    finally:
        subscription.close()
