"""The hub: one broker subscription per process, fanned out to every stream.

One ``Hub`` per worker process owns one ``Listener`` (one broker connection)
in its own greenlet. Streams ask it for a ``Subscription``: the hub subscribes
a channel at the broker when its first local subscriber arrives and drops it
when the last one leaves (reference counting), and copies each event into the
bounded queue of every subscription on its channel. The event's SSE frame is
encoded once, in the ``Event``, and shared.

Threads: under gunicorn's gevent worker ``threading`` is patched, so the hub's
threads are greenlets; under ``runserver`` they are real threads. Hub state is
guarded by one lock and nothing blocks while holding it.

Faults: when the broker connection fails, the hub logs once, reconnects with
jittered exponential backoff, re-subscribes every channel it holds, and
replays from the broker's history whatever was published since the last
position it saw, so open streams go on without a gap. Channels whose history
was trimmed meanwhile are closed (their browsers reconnect and reset). While
disconnected, ``subscribe`` raises ``BrokerUnavailable`` at once.

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
import threading
import time
import uuid
from collections import Counter

from myapp.brokers.base import HUB_CHANNEL_PREFIX, Subscribed, Trimmed
from myapp.exceptions import BrokerUnavailable

__all__ = ["Hub", "Subscription", "TooManyStreams", "get_hub", "shutdown", "reset"]

log = logging.getLogger("myapp.hub")

#: Reasons a hub closes a subscription (``Subscription.closed``).
OVERFLOW = "overflow"  # the stream fell behind by more than its queue holds
SHUTDOWN = "shutdown"  # the worker is stopping (deploy)
GAP = "gap"  # events were lost during a broker outage; the browser must resume
HUB_STOPPED = "hub stopped"
UNSUBSCRIBED = "unsubscribed"


class TooManyStreams(Exception):
    """The stream key (a user) already holds ``max_streams_per_key`` streams in this process."""


class Subscription:
    """One stream's view of the hub: its channels and its bounded queue.

    The hub appends ``myapp.events.Event`` objects and heartbeat positions
    (int) to the queue; the stream takes them in batches with ``get``.
    ``closed`` is None while open, else the reason (a str).
    """

    __slots__ = ("channels", "key", "closed", "_items", "_wake", "_maxsize", "_pending", "_ready", "_hub")

    def __init__(self, hub, channels, key, maxsize):
        self._hub = hub
        self.channels = channels
        self.key = key
        self.closed = None
        self._items = []
        self._wake = threading.Event()
        self._maxsize = maxsize
        self._pending = set(channels)
        self._ready = threading.Event()

    def get(self, timeout=None):
        """Return the queued items (list), waiting up to ``timeout`` seconds for one.

        timeout: seconds (float), or None to wait until an item arrives or the
        subscription closes. Returns an empty list on timeout.
        """
        if not self._items and self.closed is None:
            self._wake.wait(timeout)
        self._wake.clear()
        with self._hub._lock:
            items, self._items = self._items, []
        return items

    def close(self):
        """Leave the hub. Safe to call twice."""
        self._hub._close(self, UNSUBSCRIBED)


class Hub:
    """The per-process fan-out from one broker listener to many streams.

    broker: a ``myapp.brokers.base.Broker``.
    heartbeat_interval: seconds between heartbeats to every stream and
        markers to the broker (float).
    queue_size: events a subscription may hold before it is closed as too
        slow (int).
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
        self._channels = {}  # channel -> set of Subscription
        self._subscriptions = set()
        self._keys = Counter()
        self._confirmed = set()  # channels the broker confirmed on this connection
        self._inflight = {}  # channel -> SUBSCRIBE commands sent but not yet confirmed
        self._to_subscribe = set()
        self._to_unsubscribe = set()
        self._position = 0
        self._positioned = False

        self._listener = None
        self._connected = threading.Event()
        self._attempted = threading.Event()  # set once the first connection attempt ended
        self._stop = threading.Event()
        self._threads = []
        self.outage_started = None  # time.monotonic() of the current outage, or None
        self.stopped = False

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Start the listener and heartbeat threads (greenlets under gevent)."""
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
            return {"streams": len(self._subscriptions), "channels": len(self._channels), "connected": self.connected}

    # -- streams -------------------------------------------------------------

    def subscribe(self, channels, *, key=None, timeout=None):
        """Subscribe a new stream to ``channels`` and return its ``Subscription``.

        channels: iterable of channel names (str).
        key: what ``max_streams_per_key`` counts (e.g. a user id), or None.
        timeout: seconds to wait for the broker's confirmation (default
            ``subscribe_timeout``).

        Returns only after the broker confirmed every channel, so every event
        published after this call returns reaches the subscription.

        Raise BrokerUnavailable if the broker is down or does not confirm in
        time; TooManyStreams if ``key`` holds too many streams already.
        """
        timeout = self.subscribe_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self.available(timeout):
            raise BrokerUnavailable("the broker is unreachable; the hub is reconnecting")
        channels = tuple(dict.fromkeys(channels))
        subscription = Subscription(self, channels, key, self.queue_size)
        with self._lock:
            if self.at_limit(key):
                raise TooManyStreams(f"at most {self.max_streams_per_key} streams per user")
            for channel in channels:
                holders = self._channels.get(channel)
                if holders is None:
                    self._channels[channel] = {subscription}
                    if channel in self._to_unsubscribe:
                        self._to_unsubscribe.discard(channel)
                    elif channel not in self._confirmed and channel not in self._inflight:
                        self._to_subscribe.add(channel)
                else:
                    holders.add(subscription)
                if channel in self._confirmed:
                    subscription._pending.discard(channel)
            self._subscriptions.add(subscription)
            if key is not None:
                self._keys[key] += 1
            if not subscription._pending:
                subscription._ready.set()
            wake = bool(self._to_subscribe)
        if wake:
            self._wakeup()
        if not subscription._ready.wait(max(0.0, deadline - time.monotonic())):
            self._close(subscription, UNSUBSCRIBED)
            raise BrokerUnavailable(f"the broker did not confirm the subscription within {timeout} s")
        if subscription.closed is not None:
            raise BrokerUnavailable(f"the subscription was closed: {subscription.closed}")
        return subscription

    def _close(self, subscription, reason):
        with self._lock:
            if subscription.closed is not None:
                return
            subscription.closed = reason
            self._subscriptions.discard(subscription)
            if subscription.key is not None:
                self._keys[subscription.key] -= 1
                if self._keys[subscription.key] <= 0:
                    del self._keys[subscription.key]
            wake = False
            for channel in subscription.channels:
                holders = self._channels.get(channel)
                if holders is None:
                    continue
                holders.discard(subscription)
                if not holders:
                    del self._channels[channel]
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
                channels = list(self._channels)
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
                caught_up = self._catch_up(channels)
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

    def _catch_up(self, channels):
        try:
            history = self.broker.history(channels, self._position)
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
            holders = self._channels.get(channel)
            if holders is None:
                return
            self._confirmed.add(channel)
            for subscription in holders:
                pending = subscription._pending
                if channel in pending:
                    pending.discard(channel)
                    if not pending:
                        subscription._ready.set()

    def _dispatch(self, event):
        """Copy ``event`` into the queue of every subscription on its channel."""
        overflowed = None
        with self._lock:
            if event.pos <= self._position:
                return  # already dispatched (history and live overlap after a reconnect)
            holders = self._channels.get(event.channel)
            if holders:
                for subscription in holders:
                    items = subscription._items
                    if len(items) < subscription._maxsize:
                        items.append(event)
                        subscription._wake.set()
                    else:
                        if overflowed is None:
                            overflowed = []
                        overflowed.append(subscription)
            self._position = event.pos
        if overflowed:
            for subscription in overflowed:
                self._close(subscription, OVERFLOW)

    # -- heartbeats ------------------------------------------------------------

    def _heartbeats(self):
        while not self._stop.wait(self.heartbeat_interval):
            with self._lock:
                position = self._position
                for subscription in self._subscriptions:
                    items = subscription._items
                    if items and type(items[-1]) is int:
                        items[-1] = position  # a stalled stream keeps one heartbeat, not many
                    else:
                        items.append(position)
                    subscription._wake.set()


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
