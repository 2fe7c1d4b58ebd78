"""The hub: one broker subscription per process, fanned out to every stream.

One ``Hub`` per worker process owns one ``Listener`` (one broker connection)
in its own greenlet. Streams ask it for a ``Subscription``: the hub subscribes
a channel at the broker when its first local subscriber arrives and drops it
when the last one leaves (reference counting), and copies each event into the
bounded queue of every subscription on its channel. The event's SSE frame is
encoded once, in the ``Event``, and shared.

Starting a stream needs no broker call from the stream itself: the hub
activates new subscriptions in its own greenlet, in batches. Once the broker
confirmed a subscription's channels, the hub reads their history after the
stream's start position (one read for the whole batch), puts the replay at the
head of the subscription's queue, and only then lets live events in. A fresh
stream on channels the hub already holds starts at once, at the hub's position.

Threads: under gunicorn's gevent worker ``threading`` is patched, so the hub's
threads are greenlets; under ``runserver`` they are real threads. Hub state is
guarded by one lock and nothing blocks while holding it.

Faults: when the broker connection fails, the hub logs once, reconnects with
jittered exponential backoff, re-subscribes every channel it holds, and
replays from the broker's history whatever was published since the last
position it saw, so open streams go on without a gap. Channels whose history
was trimmed meanwhile are closed (their browsers reconnect and reset). While
disconnected, ``subscribe`` raises ``BrokerUnavailable`` at once.

Direct writes: while a stream waits with nothing queued, the hub sends each
event (and heartbeat) straight to its socket with one non-blocking send, and
wakes the stream's greenlet only when the socket takes less than all of it
(see ``myapp.sink``). A broadcast to thousands of idle streams is then one
system call per stream and no greenlet switch.

Liveness: every ``heartbeat_interval`` seconds the hub publishes a marker on
its private channel through its own listener; a marker that does not come back
within ``liveness_timeout`` seconds means the connection is dead (e.g. a
half-open TCP connection) and the hub reconnects. Markers also tell the hub
how far the broker's order has reached, so idle streams can move their
browser's last event id forward (see ``myapp.stream``).
"""

import logging
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict

from myapp import sse
from myapp.brokers.base import HUB_CHANNEL_PREFIX, Subscribed, Trimmed
from myapp.exceptions import BrokerUnavailable
from myapp.ids import format_id, milliseconds, parse
from myapp.sink import chunk

__all__ = ["Hub", "Subscription", "Heartbeat", "Tail", "TooManyStreams", "get_hub", "shutdown", "reset"]

log = logging.getLogger("myapp.hub")

#: Reasons a hub closes a subscription (``Subscription.closed``).
OVERFLOW = "overflow"  # the stream fell behind by more than its queue holds
SHUTDOWN = "shutdown"  # the worker is stopping (deploy)
GAP = "gap"  # events were lost during a broker outage; the browser must resume
HUB_STOPPED = "hub stopped"
UNSUBSCRIBED = "unsubscribed"
DISCONNECTED = "disconnected"  # a direct write found the connection gone

#: Reasons a subscription starts with a reset instead of resuming (``Subscription.reset``).
MALFORMED = "malformed"  # the Last-Event-ID is not an id of ours
UNKNOWN = "unknown"  # newer than anything the broker handed out
EXPIRED = "expired"  # older than the history's time-to-live
TRIMMED = "trimmed"  # events after it are no longer in the history


def _patched_by_gevent():
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


#: True when threads are greenlets (gunicorn's gevent worker): then code that
#: does not yield runs without interruption and needs no lock.
_GREENLETS = _patched_by_gevent()

#: Seconds between two heartbeat slices: each slice serves an equal share of
#: the streams, so a heartbeat round never wakes every stream at once.
HEARTBEAT_SLICE_SECONDS = 0.25


class TooManyStreams(Exception):
    """The stream key (a user) already holds ``max_streams_per_key`` streams in this process."""


class Heartbeat:
    """A queue item: write a heartbeat; ``pos`` is the hub's position when it was sent.

    ``frame`` is the heartbeat comment with an ``id:`` line for ``pos``
    (encoded once per slice and shared), ``chunk`` the same as one HTTP/1.1
    chunk; ``HEARTBEAT`` has no id.
    """

    __slots__ = ("pos", "frame", "chunk")

    def __init__(self, pos):
        self.pos = pos
        self.frame = sse.encode(comment="", id=format_id(pos))
        self.chunk = chunk(self.frame)

    def wire(self, sent, chunked):
        """Return (bytes to write, the stream's position after them) for a stream that was sent ``sent``.

        sent: the position the stream has sent (int). The heartbeat carries
        an id only when it moves the stream's position forward.
        chunked: True for one HTTP/1.1 chunk (a direct write), False for the
        bare frame.
        """
        if self.pos > sent:
            return (self.chunk if chunked else self.frame), self.pos
        return (HEARTBEAT_CHUNK if chunked else HEARTBEAT), sent


#: A heartbeat frame without an id (the stream already sent that position).
HEARTBEAT = sse.comment()
HEARTBEAT_CHUNK = chunk(HEARTBEAT)


class Tail:
    """A queue item: bytes a direct write left unsent; the stream writes them as they are, first.

    data: the rest of the frame, already framed for the wire (bytes).
    pos: the subscription's position once they are written (int).
    """

    __slots__ = ("data", "pos")

    def __init__(self, data, pos):
        self.data = data
        self.pos = pos


class Subscription:
    """One stream's view of the hub: its channels, start and bounded queue.

    ``start`` is the position the stream starts from (int) and ``reset`` the
    reason it could not resume from its Last-Event-ID (a str), or None.
    ``pos`` is the position the client has been sent (int): the stream and
    the hub's direct writes skip anything at or before it. The queue holds
    ``myapp.events.Event`` objects (the replay first, then live events),
    ``Heartbeat`` items and ``Tail`` items; the stream takes them in batches
    with ``get``. ``closed`` is None while open, else the reason (a str).

    ``direct`` is None, or the ``myapp.sink.Sink`` of the stream's socket once
    its response has started: then the hub writes to it directly while the
    stream waits in ``get`` with nothing queued.
    """

    __slots__ = (
        "channels",
        "key",
        "start",
        "reset",
        "closed",
        "pos",
        "direct",
        "_sink",
        "_resume",
        "_items",
        "_wake",
        "_maxsize",
        "_ready",
        "_slice",
        "_hub",
    )

    def __init__(self, hub, channels, key, maxsize):
        self._hub = hub
        self.channels = channels
        self.key = key
        self.start = 0
        self.reset = None
        self.closed = None
        self.pos = 0
        self.direct = None
        self._sink = None  # ``direct`` while parked in get(), else None
        self._resume = None
        self._items = []
        self._wake = threading.Event()
        self._maxsize = maxsize
        self._ready = threading.Event()
        self._slice = None

    def get(self, timeout=None):
        """Return the queued items (list), waiting for one if there are none.

        timeout: seconds (float), or None to wait until an item arrives or the
        subscription closes (heartbeats arrive every heartbeat interval).
        Returns an empty list on timeout.

        With ``direct`` set, the wait parks the subscription: the hub writes
        to the socket itself meanwhile and wakes it only for what it could
        not write at once (a ``Tail``), a close, or a full socket.
        """
        if not self._items and self.closed is None:
            sink = self.direct
            if sink is None or timeout == 0:
                self._wake.wait(timeout)
            elif _GREENLETS:
                # One OS thread: the hub runs only while this greenlet waits.
                self._sink = sink
                try:
                    self._wake.wait(timeout)
                finally:
                    self._sink = None
            else:
                # Threads: park and unpark under the lock the hub writes under,
                # so a direct write never overlaps the stream's own writes.
                with self._hub._lock:
                    if not self._items and self.closed is None:
                        self._sink = sink
                try:
                    self._wake.wait(timeout)
                finally:
                    with self._hub._lock:
                        self._sink = None
        self._wake.clear()
        if _GREENLETS:
            # One OS thread: nothing can run between these two reads and writes.
            items, self._items = self._items, []
        else:
            with self._hub._lock:
                items, self._items = self._items, []
        self._maxsize = self._hub.queue_size  # the replay's extra room is used up
        return items

    def close(self):
        """Leave the hub. Safe to call twice."""
        self._hub._close(self, UNSUBSCRIBED)


class Hub:
    """The per-process fan-out from one broker listener to many streams.

    broker: a ``myapp.brokers.base.Broker``.
    heartbeat_interval: seconds between two heartbeats of a stream and between
        markers to the broker (float).
    queue_size: live events a subscription may hold before it is closed as too
        slow (int); its replay does not count.
    subscribe_timeout: seconds ``subscribe`` waits for the broker to confirm.
    liveness_timeout: seconds a marker may take to come back before the
        connection counts as dead.
    max_streams_per_key: streams one key (a user) may hold in this process,
        or None for no limit.
    reconnect_delay: (first, max) seconds between reconnection attempts.
    """

    def __init__(
        self,
        broker,
        *,
        heartbeat_interval=15.0,
        queue_size=1000,
        subscribe_timeout=5.0,
        liveness_timeout=10.0,
        max_streams_per_key=None,
        reconnect_delay=(0.1, 5.0),
    ):
        self.broker = broker
        self.heartbeat_interval = heartbeat_interval
        self.queue_size = queue_size
        self.subscribe_timeout = subscribe_timeout
        self.liveness_timeout = liveness_timeout
        self.max_streams_per_key = max_streams_per_key
        self.reconnect_delay = reconnect_delay
        self.pid = os.getpid()
        self.hub_channel = f"{HUB_CHANNEL_PREFIX}{self.pid}-{uuid.uuid4().hex[:12]}"

        self._lock = threading.Lock()
        self._channels = {}  # channel -> set of active Subscriptions (those receiving live events)
        self._refs = Counter()  # channel -> subscriptions that want it (active or pending)
        self._subscriptions = set()  # every open subscription
        self._pending = []  # subscriptions waiting for confirmation and their replay
        self._keys = Counter()
        self._confirmed = set()  # channels the broker confirmed on this connection
        self._inflight = {}  # channel -> SUBSCRIBE commands sent but not yet confirmed
        self._to_subscribe = set()
        self._to_unsubscribe = set()
        self._position = 0
        self._positioned = False
        slices = max(1, round(heartbeat_interval / HEARTBEAT_SLICE_SECONDS))
        self._slices = [set() for _ in range(slices)]
        self._next_slice = 0

        self._listener = None
        self._connected = threading.Event()
        self._attempted = threading.Event()  # set once the first connection attempt ended
        self._stop = threading.Event()
        self._threads = []
        self.outage_started = None  # time.monotonic() of the current outage, or None
        self.stopped = False

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Start the listener and heartbeat threads (greenlets under gevent). Return self."""
        for target, name in ((self._run, "myapp-hub"), (self._heartbeats, "myapp-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, reason=HUB_STOPPED):
        """Close every subscription with ``reason`` and stop the hub's threads."""
        self.stopped = True
        self._stop.set()
        listener = self._listener
        if listener is not None:
            listener.wakeup()
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            self._close(subscription, reason)

    @property
    def connected(self):
        """True while the broker connection is up."""
        return self._connected.is_set()

    def available(self, timeout=None):
        """Return True if the broker connection is up.

        Waits up to ``timeout`` seconds (default ``subscribe_timeout``) only
        while the hub makes its first connection; during an outage it answers
        False at once.
        """
        if self._connected.is_set():
            return True
        if not self.stopped and self.outage_started is None:
            self._attempted.wait(self.subscribe_timeout if timeout is None else timeout)
        return self._connected.is_set()

    @property
    def position(self):
        """The newest broker position this hub has dispatched (int)."""
        return self._position

    def at_limit(self, key):
        """Return True if ``key`` already holds ``max_streams_per_key`` streams here."""
        limit = self.max_streams_per_key
        return key is not None and limit is not None and self._keys[key] >= limit

    def stats(self):
        """Return a dict of counts: streams, channels, connected."""
        with self._lock:
            return {"streams": len(self._subscriptions), "channels": len(self._refs), "connected": self.connected}

    # -- streams -------------------------------------------------------------

    def subscribe(self, channels, *, last_event_id=None, key=None, timeout=None):
        """Subscribe a new stream to ``channels`` and return its ``Subscription``.

        channels: iterable of channel names (str).
        last_event_id: the client's Last-Event-ID (str) to resume from, or
            None for a fresh stream (which starts at the hub's position).
        key: what ``max_streams_per_key`` counts (e.g. a user id), or None.
        timeout: seconds to wait for the broker's confirmation and the replay
            (default ``subscribe_timeout``).

        Returns once the broker confirmed every channel and the replay (the
        events after the start, at most the history's length per channel) is
        queued, so no event published after the start is missed. Resuming is
        impossible when the id is malformed, newer than the broker's newest
        position, older than the history's time-to-live, or followed by
        trimmed events: the subscription then starts at the hub's position
        with ``reset`` set to the reason (WHATWG HTML 9.2: a non-200 answer
        would stop the browser, so the stream resets instead).

        Raise BrokerUnavailable if the broker is down or does not confirm in
        time; TooManyStreams if ``key`` holds too many streams already.
        """
        timeout = self.subscribe_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self.available(timeout):
            raise BrokerUnavailable("the broker is unreachable; the hub is reconnecting")
        channels = tuple(dict.fromkeys(channels))
        subscription = Subscription(self, channels, key, self.queue_size)
        if last_event_id is not None:
            subscription._resume = parse(last_event_id)
            if subscription._resume is None:
                subscription.reset = MALFORMED
        with self._lock:
            if self.at_limit(key):
                raise TooManyStreams(f"at most {self.max_streams_per_key} streams per user")
            for channel in channels:
                self._refs[channel] += 1
                if self._refs[channel] == 1:
                    if channel in self._to_unsubscribe:
                        self._to_unsubscribe.discard(channel)
                    elif channel not in self._confirmed and channel not in self._inflight:
                        self._to_subscribe.add(channel)
            self._subscriptions.add(subscription)
            if key is not None:
                self._keys[key] += 1
            subscription.start = subscription.pos = self._position
            confirmed = all(channel in self._confirmed for channel in channels)
            if subscription._resume is None and confirmed:
                # Fresh, on channels already held: every event after the hub's
                # position reaches it live, so it needs no replay.
                self._activate(subscription)
            else:
                self._pending.append(subscription)
            # The hub must act now only to send a SUBSCRIBE or to replay for
            # confirmed channels; a confirmation still on its way wakes it anyway
            # (so a storm of streams on one new channel is one wake-up, not one each).
            wake = confirmed or bool(self._to_subscribe)
        if not subscription._ready.is_set():
            if wake:
                self._wakeup()
            if not subscription._ready.wait(max(0.0, deadline - time.monotonic())):
                self._close(subscription, UNSUBSCRIBED)
                raise BrokerUnavailable(f"the broker did not confirm the subscription within {timeout} s")
        if subscription.closed is not None:
            raise BrokerUnavailable(f"the subscription was closed: {subscription.closed}")
        return subscription

    def _activate(self, subscription):
        """Let live events in (call with the lock held, after its replay is queued)."""
        for channel in subscription.channels:
            holders = self._channels.get(channel)
            if holders is None:
                self._channels[channel] = {subscription}
            else:
                holders.add(subscription)
        subscription._slice = self._next_slice
        self._slices[self._next_slice].add(subscription)
        self._next_slice = (self._next_slice + 1) % len(self._slices)
        subscription._ready.set()

    def _close(self, subscription, reason):
        with self._lock:
            if subscription.closed is not None:
                return
            subscription.closed = reason
            subscription.direct = subscription._sink = None
            self._subscriptions.discard(subscription)
            if subscription._slice is not None:
                self._slices[subscription._slice].discard(subscription)
            if subscription.key is not None:
                self._keys[subscription.key] -= 1
                if self._keys[subscription.key] <= 0:
                    del self._keys[subscription.key]
            wake = False
            for channel in subscription.channels:
                holders = self._channels.get(channel)
                if holders is not None:
                    holders.discard(subscription)
                    if not holders:
                        del self._channels[channel]
                self._refs[channel] -= 1
                if self._refs[channel] <= 0:
                    del self._refs[channel]
                    if channel in self._to_subscribe:
                        self._to_subscribe.discard(channel)
                    else:
                        self._to_unsubscribe.add(channel)
                        wake = True
        subscription._ready.set()
        subscription._wake.set()
        if wake:
            self._wakeup()

    def _wakeup(self):
        listener = self._listener
        if listener is not None:
            listener.wakeup()

    # -- the listener greenlet ----------------------------------------------

    def _run(self):
        delay = self.reconnect_delay[0]
        try:
            while not self._stop.is_set():
                try:
                    self._connect()
                    delay = self.reconnect_delay[0]
                    self._serve()
                except BrokerUnavailable as error:
                    self._lost(error)
                except Exception as error:  # noqa: BLE001 - a bug must not end the fan-out for good
                    log.exception("hub: unexpected error; reconnecting")
                    self._lost(error)
                if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                    break
                delay = min(delay * 2, self.reconnect_delay[1])
        finally:
            self._drop_listener()
            if not self.stopped:
                log.error("hub: listener thread ended; closing all streams")
                self.stop()

    def _lost(self, error):
        self._connected.clear()
        self._attempted.set()
        self._drop_listener()
        if self.outage_started is None:
            self.outage_started = time.monotonic()
            log.warning("hub: broker connection lost (%s); reconnecting", error)
        else:
            log.debug("hub: reconnection failed (%s)", error)

    def _drop_listener(self):
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _connect(self):
        broker = self.broker
        listener = broker.listener(self.hub_channel)
        try:
            if not self._positioned:
                # The first connection starts from the broker's newest position;
                # later ones catch up from the last position dispatched.
                try:
                    self._position = broker.last_position()
                finally:
                    broker.release()
                self._positioned = True
            with self._lock:
                channels = list(self._refs)
                self._confirmed.clear()
                self._to_subscribe.clear()
                self._to_unsubscribe.clear()
                self._inflight = dict.fromkeys(channels, 1)
            buffered = []
            caught_up = 0
            if channels:
                listener.subscribe(channels)
                deadline = time.monotonic() + self.subscribe_timeout
                while self._inflight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BrokerUnavailable(f"re-subscription not confirmed within {self.subscribe_timeout} s")
                    for item in listener.wait(remaining):
                        if type(item) is Subscribed:
                            self._confirm(item.channel)
                        else:
                            buffered.append(item)  # after the catch-up, in order
                caught_up = self._catch_up([channel for channel in channels if channel in self._channels])
            self._listener = listener
        except BaseException:
            listener.close()
            raise
        self._connected.set()
        self._attempted.set()
        if self.outage_started is not None:
            log.warning(
                "hub: broker connection recovered after %.1f s; re-subscribed %d channels, replayed %d events",
                time.monotonic() - self.outage_started,
                len(channels),
                caught_up,
            )
            self.outage_started = None
        for item in buffered:
            self._handle(item)
        self._activate_pending()

    def _catch_up(self, channels):
        """Dispatch what the active streams' channels missed while the hub was away."""
        if not channels:
            return 0
        try:
            history = self.broker.history(channels, self._position)
            if history.epoch > self._position:
                # The broker lost its data while we were away (e.g. Redis
                # restarted without persistence). Open streams were live until
                # the drop, so they go on with everything the new history holds;
                # whatever was published between the drop and the loss is gone.
                log.warning(
                    "hub: the broker's history starts again at %s (its data was lost); "
                    "events published before that and not yet received are gone",
                    format_id(history.epoch),
                )
                history = self.broker.history(channels, history.epoch)
        finally:
            self.broker.release()
        for event in history.events:
            self._dispatch(event)
        if history.trimmed:
            self._close_channels(history.trimmed, GAP)
        return len(history.events)

    def _serve(self):
        listener = self._listener
        interval = self.heartbeat_interval
        next_marker = time.monotonic() + interval
        marker_sent = None
        while not self._stop.is_set():
            self._flush(listener)
            if self._pending:
                self._activate_pending()
            now = time.monotonic()
            if now >= next_marker:
                listener.publish_marker()
                if marker_sent is None:
                    marker_sent = now
                next_marker = now + interval
            if marker_sent is not None and now - marker_sent > self.liveness_timeout:
                raise BrokerUnavailable(f"no marker came back within {self.liveness_timeout} s")
            timeout = next_marker - now
            if marker_sent is not None:
                timeout = min(timeout, marker_sent + self.liveness_timeout - now)
            for item in listener.wait(max(timeout, 0.0)):
                if type(item) is Subscribed:
                    self._confirm(item.channel)
                else:
                    if item.channel == self.hub_channel:
                        marker_sent = None
                    self._handle(item)

    def _handle(self, item):
        if type(item) is Trimmed:
            self._close_channels([item.channel], GAP)
        else:
            self._dispatch(item)

    def _close_channels(self, channels, reason):
        with self._lock:
            victims = {sub for channel in channels for sub in self._channels.get(channel, ())}
        for subscription in victims:
            self._close(subscription, reason)

    def _flush(self, listener):
        with self._lock:
            if not self._to_subscribe and not self._to_unsubscribe:
                return
            subscribe, self._to_subscribe = list(self._to_subscribe), set()
            unsubscribe, self._to_unsubscribe = list(self._to_unsubscribe), set()
            self._confirmed.difference_update(unsubscribe)
            for channel in subscribe:
                self._inflight[channel] = self._inflight.get(channel, 0) + 1
        if unsubscribe:
            listener.unsubscribe(unsubscribe)
        if subscribe:
            listener.subscribe(subscribe)

    def _confirm(self, channel):
        with self._lock:
            count = self._inflight.get(channel)
            if count is None:
                return
            if count > 1:
                self._inflight[channel] = count - 1
                return
            del self._inflight[channel]
            if channel in self._refs:
                self._confirmed.add(channel)

    def _activate_pending(self):
        """Queue the replay of every pending subscription whose channels are confirmed, then activate it.

        One ``last_position`` and one ``history`` call serve the whole batch.
        """
        with self._lock:
            confirmed = self._confirmed
            waiting, ready = [], []
            for sub in self._pending:
                if sub.closed is None:
                    (ready if all(channel in confirmed for channel in sub.channels) else waiting).append(sub)
            self._pending = waiting
            if not ready:
                return
        try:
            # Channels are confirmed: every event after this head arrives live,
            # and the history read below covers the head up to the read.
            head = max(self._position, self.broker.last_position())
            ttl_ms = self.broker.history_ttl * 1000
            for sub in ready:
                resume = sub._resume
                sub.start = head
                if sub.reset is None and resume is not None:
                    if resume > head:
                        sub.reset = UNKNOWN
                    elif milliseconds(head) - milliseconds(resume) > ttl_ms:
                        sub.reset = EXPIRED
                    else:
                        sub.start = resume
            self._queue_replays(ready, head)
        except BaseException:
            with self._lock:
                self._pending.extend(ready)  # retried after the reconnection
            raise
        finally:
            self.broker.release()
        with self._lock:
            for sub in ready:
                if sub.closed is None:
                    self._activate(sub)

    def _queue_replays(self, subs, head):
        """Read the history once for all ``subs`` and queue each one's replay (events after its start)."""
        channels = {channel for sub in subs for channel in sub.channels}
        history = self.broker.history(channels, min(sub.start for sub in subs))
        by_channel = defaultdict(list)
        for event in history.events:
            by_channel[event.channel].append(event)

        def replay_of(sub):
            replay = []
            for channel in sub.channels:
                events = [event for event in by_channel.get(channel, ()) if event.pos > sub.start]
                if events and events[0].prev > sub.start:
                    return None  # trimmed: events after the start are gone
                replay.extend(events)
            replay.sort(key=lambda event: event.pos)
            return replay

        for sub in subs:
            replay = replay_of(sub)
            if replay is None:
                sub.reset, sub.start = TRIMMED, head
                replay = replay_of(sub)
            sub.pos = sub.start
            sub._items.extend(replay)
            sub._maxsize += len(replay)

    def _dispatch(self, event):
        """Write ``event`` to every parked subscription on its channel and queue it for the others."""
        closing = None
        pos = event.pos
        with self._lock:
            if pos <= self._position:
                return  # already dispatched (history and live overlap after a reconnect)
            holders = self._channels.get(event.channel)
            if holders:
                frame, framed = event.frame, event.chunk  # encoded once for every stream
                for subscription in holders:
                    sink = subscription._sink
                    if sink is not None:
                        if pos > subscription.pos:
                            reason = _write(subscription, sink, framed if sink.chunked else frame, pos)
                            if reason is not None:
                                closing = closing or []
                                closing.append((subscription, reason))
                        continue
                    items = subscription._items
                    if len(items) < subscription._maxsize:
                        items.append(event)
                        subscription._wake.set()
                    else:
                        closing = closing or []
                        closing.append((subscription, OVERFLOW))
            self._position = pos
        if closing:
            for subscription, reason in closing:
                self._close(subscription, reason)

    # -- heartbeats ------------------------------------------------------------

    def _heartbeats(self):
        """Every slice interval, send a heartbeat to one slice of the active streams."""
        step = self.heartbeat_interval / len(self._slices)
        index = 0
        try:
            while not self._stop.wait(step):
                dead = None
                with self._lock:
                    beat = Heartbeat(self._position)
                    for subscription in self._slices[index]:
                        sink = subscription._sink
                        if sink is not None:
                            wire, pos = beat.wire(subscription.pos, sink.chunked)
                            if _write(subscription, sink, wire, pos) is not None:
                                dead = dead or []
                                dead.append(subscription)
                            continue
                        items = subscription._items
                        if items and type(items[-1]) is Heartbeat:
                            items[-1] = beat  # a stalled stream keeps one heartbeat, not many
                        else:
                            items.append(beat)
                        subscription._wake.set()
                index = (index + 1) % len(self._slices)
                if dead:
                    for subscription in dead:
                        self._close(subscription, DISCONNECTED)
        finally:
            if not self.stopped:
                log.error("hub: heartbeat thread ended; closing all streams")
                self.stop()


def _write(subscription, sink, wire, pos):
    """Send ``wire`` to a parked subscription's socket (call with the hub's lock held).

    What the socket does not take at once goes to the stream as a ``Tail``,
    which unparks it. Return None, or DISCONNECTED if the connection is gone.
    """
    try:
        sent = sink.send(wire)
    except OSError:
        return DISCONNECTED
    subscription.pos = pos
    if sent < len(wire):
        subscription._sink = None
        subscription._items.append(Tail(wire[sent:], pos))
        subscription._wake.set()
    return None


# -- the process's hub ---------------------------------------------------------

_hub = None
_hub_lock = threading.Lock()


def get_hub():
    """Return this process's running ``Hub``, creating and starting it on first use.

    Created lazily (never at import), so under gunicorn it starts inside the
    worker after gevent patched the process; guarded by a lock so a burst of
    first requests builds exactly one. A hub that stopped, or one inherited
    across ``fork``, is replaced.
    """
    global _hub
    hub = _hub
    if hub is not None and not hub.stopped and hub.pid == os.getpid():
        return hub
    with _hub_lock:
        hub = _hub
        if hub is None or hub.stopped or hub.pid != os.getpid():
            from myapp import conf
            from myapp.brokers import get_broker

            hub = Hub(
                get_broker(),
                heartbeat_interval=conf.heartbeat_seconds(),
                queue_size=conf.setting("MYAPP_STREAM_QUEUE_SIZE"),
                subscribe_timeout=conf.setting("MYAPP_SUBSCRIBE_TIMEOUT_SECONDS"),
                max_streams_per_key=conf.setting("MYAPP_MAX_STREAMS_PER_USER"),
            ).start()
            _hub = hub
    return hub


def shutdown(reason=SHUTDOWN):
    """Close every stream of this process's hub (if any) with ``reason`` and stop it.

    Called from gunicorn's SIGTERM handler (see gunicorn.conf.py) so open
    streams end at once and their browsers resume on another worker.
    """
    global _hub
    with _hub_lock:
        hub, _hub = _hub, None
    if hub is not None and hub.pid == os.getpid():
        hub.stop(reason)


def reset():
    """Stop and forget the process's hub (used when settings change in tests)."""
    shutdown(HUB_STOPPED)
