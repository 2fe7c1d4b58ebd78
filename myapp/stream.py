"""One SSE stream: the generator a ``StreamingHttpResponse`` iterates.

The hub does the broker work (``myapp.hub.Hub.subscribe``: confirmation,
the start position and the replay, by the policy of ``myapp.resume``) and
queues ready frames; the stream writes them. It sends, in order:

1. at once, so the response headers leave too: one ``stream.open`` event
   (data ``{"channels": [...], "resumed": bool}``) or ``stream.reset``
   event (data ``{"reason": ...}``) whose id is the position the stream
   starts from, so even a page that received nothing yet reconnects without
   a gap, and whose block carries ``retry: <ms>`` (jittered between 1x and 2x
   the setting, so reconnects after a deploy spread);
2. the replay and live events, each burst of queued frames in one write;
3. on its end (overflow, shutdown, lifetime), a data-less
   ``stream.position`` block with the comment ``closing: <reason>`` and a
   ``retry``: the browser reconnects and resumes. A client that hung up gets
   nothing more.

Every block is an event of the page's or a named ``stream.*`` block, never a
bare comment or ``retry`` (see ``myapp.subscription.POSITION_EVENT``).

Once the first write has left, the stream tells the hub its socket: the hub
then writes events and heartbeats to it directly while the stream waits
(``myapp.sink``), and closes the stream as soon as the client hangs up
(``myapp.hangups``).
"""

import json
import random
import time

from myapp import sse
from myapp.events import OPEN_EVENT, RESET_EVENT
from myapp.subscription import DISCONNECTED, LIFETIME, closing_frame

__all__ = ["open_stream", "Stream"]


def open_stream(hub, channels, last_event_id=None, *, owner=None, retry_ms=2000, lifetime=None):
    """Subscribe to ``channels`` and return the stream (a ``Stream``: an iterable of bytes).

    hub: the process's ``myapp.hub.Hub``.
    channels: channel names (tuple of str), already authorized.
    last_event_id: the client's Last-Event-ID (str) or None for a fresh stream.
    owner: what the hub's per-user stream limit counts, or None.
    retry_ms: the base reconnection delay in milliseconds; each stream sends
        a value jittered between 1x and 2x so reconnects after a deploy spread.
    lifetime: seconds after which the stream ends (the browser reconnects and
        is authorized again), or None.

    Raise BrokerUnavailable (broker down) or TooManyStreams before anything
    is sent; the caller answers 503 or 429.
    """
    subscription = hub.subscribe(channels, last_event_id=last_event_id, owner=owner)
    retry = random.randint(retry_ms, 2 * retry_ms)
    start = subscription.start_id
    if subscription.reset is not None:
        first = sse.encode(json.dumps({"reason": subscription.reset}), event=RESET_EVENT, id=start, retry=retry)
    else:
        opened = {"channels": list(channels), "resumed": bool(last_event_id)}
        first = sse.encode(json.dumps(opened), event=OPEN_EVENT, id=start, retry=retry)
    return Stream(hub, subscription, [first], retry, lifetime)


class Stream:
    """What the view hands to ``StreamingHttpResponse``.

    Iterating it runs the plain sync generator of frames: ``first`` (list of
    bytes frames) at once, then what the subscription queues; ``retry`` is
    the reconnection delay (milliseconds) sent when the stream ends,
    ``lifetime`` the seconds after which it ends, or None. Django calls
    ``close()`` when the response ends, which leaves the hub even if the
    server never started iterating (so no subscription can leak).
    """

    __slots__ = (
        "_frames",
        "_hub",
        "_subscription",
        "_first",
        "_retry",
        "_lifetime",
        "_sink",
        "_sock",
        "_response",
        "_request",
        "_on_close",
        "_adopted",
    )

    def __init__(self, hub, subscription, first, retry, lifetime):
        self._hub = hub
        self._subscription = subscription
        self._first = first
        self._retry = retry
        self._lifetime = lifetime
        self._sink = self._sock = self._response = self._request = None
        self._on_close = None
        self._adopted = False
        self._frames = _frames(self, first, retry, lifetime)

    def on_close(self, callback):
        """Call ``callback()`` (no arguments) once the stream has ended, whichever way it ends."""
        self._on_close = callback

    def attach(self, response, *, sink=None, sock=None, request=None):
        """Tell the stream about its response, before it starts.

        response: the ``StreamingHttpResponse`` carrying this stream.
        sink: a ``myapp.sink.Sink`` the hub may write to once the response
            has started, or None. If a middleware gave the response a
            ``Content-Encoding`` (compression rewrites the body), direct
            writes stay off.
        sock: the connection's socket (gunicorn's ``gunicorn.socket``),
            watched for the client's hang-up once the response has started,
            or None.
        request: the Django request, or None. Once the response has started
            (every middleware is done with it), the stream releases what the
            request carries (session, user, messages, parsed query, ...) and
            keeps only ``environ``/``META``, ``path``, ``path_info`` and
            ``method``: otherwise that state, and the reference cycles Django
            builds around it, would live as long as the stream.
        """
        self._sink = sink
        self._sock = sock
        self._response = response
        self._request = request

    def __iter__(self):
        return self._frames

    def close(self):
        self._frames.close()
        if not self._adopted:
            self._subscription.close()
            self._closed()

    def first_bytes(self):
        """The stream's first frames (bytes), for a server that writes the response itself (``myapp.adoption``)."""
        return b"".join(self._first)

    def adopt(self, sock, *, chunked):
        """Hand the connection to the hub instead of iterating; return False if the stream had ended meanwhile.

        sock: a non-blocking socket on the connection that only the hub uses
        (and closes) from now on; ``first_bytes()`` have been written to it.
        chunked: whether the response uses the chunked coding.
        The stream itself is then done: ``close()`` no longer leaves the hub.
        """
        self._adopted = True
        self._release_request()
        subscription = self._subscription
        adopted = self._hub.adopt(subscription, sock, chunked=chunked, retry=self._retry, lifetime=self._lifetime)
        if adopted:
            on_close, self._on_close = self._on_close, None
            subscription.on_end = on_close
        else:
            self._closed()
        return adopted

    def _closed(self):
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def _release_request(self):
        request, self._request = self._request, None
        if request is not None:
            state = request.__dict__
            kept = {name: state[name] for name in _KEPT_REQUEST_STATE if name in state}
            state.clear()
            state.update(kept)

    def _started(self):
        """The first write has left: release the request, and hand the socket to the hub."""
        sink, response = self._sink, self._response
        self._response = None
        self._release_request()
        if sink is not None and (response is None or response.has_header("Content-Encoding")):
            sink = None
        self._hub.attach(self._subscription, sink=sink, sock=self._sock)
        self._sock = None


#: What a streaming request keeps once its response has started.
_KEPT_REQUEST_STATE = ("environ", "META", "path", "path_info", "method")


def _frames(stream, first, retry, lifetime):
    """Yield the first frame, then each burst of queued frames in one write."""
    subscription = stream._subscription
    deadline = time.monotonic() + lifetime if lifetime else None
    out = first
    wait = 0  # the first frame and the replay leave at once, so headers do too
    try:
        while True:
            # The hub's heartbeats wake this at least every heartbeat interval;
            # closing the subscription (overflow, shutdown, hang-up, hub death)
            # wakes it too.
            tail, frames = subscription.get(wait)
            if tail is not None:
                # The rest of a direct write: it goes out before anything
                # else, as it is (already framed for the wire).
                try:
                    stream._sink.sendall(tail)
                except OSError:
                    subscription.close(DISCONNECTED)
                    return
            if frames:
                out.extend(frames)
            closed = subscription.closed
            if closed is not None:
                if closed == DISCONNECTED:
                    return
                # End between two frames; the browser reconnects after
                # ``retry`` ms and resumes from its last event id.
                out.append(closing_frame(closed, retry))
                yield b"".join(out)
                return
            if deadline is not None and time.monotonic() > deadline:
                subscription.close(LIFETIME)
                out.append(closing_frame(LIFETIME, retry))
                yield b"".join(out)
                return
            if out:
                yield b"".join(out)
                out = []
            if wait == 0:
                # The server has written the headers and the first frame.
                stream._started()
                wait = None
    finally:
        subscription.close()
        stream._closed()
