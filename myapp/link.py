"""The hub's side of the broker: one listener connection, its subscriptions, its faults.

A ``BrokerLink`` belongs to one ``myapp.hub.Hub`` and runs in the hub's
listener thread (a greenlet under gevent). It keeps the broker's view of the
hub's channels:

- reference counts: the first stream wanting a channel makes the link send
  SUBSCRIBE (LISTEN), the last one leaving UNSUBSCRIBE; commands are batched
  and sent only from the listener thread; confirmations are counted per
  channel, so a channel dropped and wanted again is live only after the
  *new* confirmation;
- pending streams: once their channels are confirmed, one ``last_position``
  and one ``history`` read serve the whole batch; each stream's start and
  replay follow ``myapp.resume``, and only then does the hub let live events
  in, so nothing published after the start is missed;
- liveness: every heartbeat interval a marker goes out through the listener;
  one that does not come back within ``liveness_timeout`` means a dead
  connection (e.g. half-open TCP);
- faults: a lost connection is logged once; the link reconnects with
  jittered exponential backoff, re-subscribes every channel (and the control
  channel, ``myapp.control``), and replays from the broker's history what
  was published since the hub's last position. A channel with a hole
  (trimmed, or the broker lost its data) resets its streams; a broker whose
  newest position is behind the hub's (lost writes) resets every stream.

The link shares the hub's lock; nothing blocks while holding it.
"""

import logging
import random
import threading
import time
from collections import Counter, defaultdict

from myapp.brokers.base import CONTROL_CHANNEL, Subscribed, Trimmed
from myapp.exceptions import BrokerUnavailable
from myapp.ids import format_id
from myapp.resume import TRIMMED, holes, replay, replay_parts, start_position, start_positions

__all__ = ["BrokerLink"]

log = logging.getLogger("myapp.hub")


class BrokerLink:
    """The listener connection of ``hub`` and the broker-side state of its channels.

    hub: the ``myapp.hub.Hub`` it serves (its broker, timeouts, lock and
        fan-out methods).
    """

    def __init__(self, hub):
        self.hub = hub
        self.broker = hub.broker
        self._lock = hub._lock
        self._refs = Counter()  # channel -> subscriptions that want it (active or pending)
        self._confirmed = set()  # channels the broker confirmed on this connection
        self._inflight = {}  # channel -> SUBSCRIBE commands sent but not yet confirmed
        self._to_subscribe = set()
        self._to_unsubscribe = set()
        self._pending = []  # (subscription, last_event_id) waiting for confirmation and replay
        self._positioned = False
        self._listener = None
        self._connected = threading.Event()
        self._attempted = threading.Event()  # set once the first connection attempt ended
        self.outage_started = None  # time.monotonic() of the current outage, or None

    # -- the hub's calls (with the lock held, except where said) -----------------

    @property
    def channels(self):
        """How many channels the link holds (int)."""
        return len(self._refs)

    def want(self, channels):
        """Count a new stream on ``channels``; return True if every one is confirmed already."""
        for channel in channels:
            self._refs[channel] += 1
            if self._refs[channel] == 1:
                if channel in self._to_unsubscribe:
                    self._to_unsubscribe.discard(channel)
                elif channel not in self._confirmed and channel not in self._inflight:
                    self._to_subscribe.add(channel)
        return all(channel in self._confirmed for channel in channels)

    @property
    def must_subscribe(self):
        """True if a SUBSCRIBE waits to be sent (the listener thread must wake up)."""
        return bool(self._to_subscribe)

    def pend(self, subscription, last_event_id):
        """Queue ``subscription`` for activation once its channels are confirmed."""
        self._pending.append((subscription, last_event_id))

    def release(self, channels):
        """Uncount a stream on ``channels``; return True if an UNSUBSCRIBE waits to be sent."""
        wake = False
        for channel in channels:
            self._refs[channel] -= 1
            if self._refs[channel] <= 0:
                del self._refs[channel]
                if channel in self._to_subscribe:
                    self._to_subscribe.discard(channel)
                else:
                    self._to_unsubscribe.add(channel)
                    wake = True
        return wake

    def wakeup(self):
        """Make the listener thread look at its queues now (safe without the lock)."""
        listener = self._listener
        if listener is not None:
            listener.wakeup()

    @property
    def connected(self):
        """True while the broker connection is up."""
        return self._connected.is_set()

    def available(self, timeout):
        """Return True if the connection is up, waiting up to ``timeout`` s only during the first attempt."""
        if self._connected.is_set():
            return True
        if not self.hub.stopped and self.outage_started is None:
            self._attempted.wait(timeout)
        return self._connected.is_set()

    # -- the listener thread ------------------------------------------------------

    def run(self):
        """Connect, serve, reconnect until the hub stops (the listener thread's body)."""
        hub = self.hub
        first, longest = hub.reconnect_delay
        delay = first
        try:
            while not hub._stop.is_set():
                try:
                    self._connect()
                    delay = first
                    self._serve()
                except BrokerUnavailable as error:
                    self._lost(error)
                except Exception as error:  # noqa: BLE001 - a bug must not end the fan-out for good
                    log.exception("hub: unexpected error; reconnecting")
                    self._lost(error)
                if hub._stop.wait(delay * random.uniform(0.5, 1.0)):
                    break
                delay = min(delay * 2, longest)
        finally:
            self._drop_listener()
            if not hub.stopped:
                log.error("hub: listener thread ended; closing all streams")
                hub.stop()

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
        hub, broker = self.hub, self.broker
        listener = broker.listener(hub.hub_channel)
        try:
            if not self._positioned:
                # The first connection starts from the broker's newest position;
                # later ones catch up from the last position dispatched.
                hub.positions = list(broker.heads())
                self._positioned = True
            else:
                self._check_order(broker.heads())
            with self._lock:
                channels = [*self._refs, CONTROL_CHANNEL]
                self._confirmed.clear()
                self._to_subscribe.clear()
                self._to_unsubscribe.clear()
                self._inflight = dict.fromkeys(channels, 1)
            buffered = []
            listener.subscribe(channels)
            deadline = time.monotonic() + hub.subscribe_timeout
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(f"re-subscription not confirmed within {hub.subscribe_timeout} s")
                for item in listener.wait(remaining):
                    if type(item) is Subscribed:
                        self._confirm(item.channel)
                    else:
                        buffered.append(item)  # after the catch-up, in order
            # Control messages published while the hub was away still apply.
            active = hub.active_channels()
            caught_up = self._catch_up([c for c in channels if c in active or c == CONTROL_CHANNEL])
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
                len(channels) - 1,
                caught_up,
            )
            outage, self.outage_started = time.monotonic() - self.outage_started, None
            hub.counters.reconnected(outage)  # after the clear: myapp.metrics reads them in the other order
        self._handle(buffered)
        self._activate_pending()

    def _check_order(self, heads):
        """Handle a broker whose newest position (``heads``, per partition) is behind what the hub dispatched.

        It lost writes the hub saw (a failover to a replica that had not
        received them, a restart from an older snapshot): later positions may
        repeat ones the streams already sent, and would be dropped as
        duplicates. Every open stream (of such a partition) gets a reset
        positioned at the head, below what it sent (its browser reloads), and
        the hub goes on from there, so nothing after it is skipped.
        """
        hub, broker = self.hub, self.broker
        behind = [part for part, head in enumerate(heads) if head < hub.positions[part]]
        if not behind:
            return
        for part in behind:
            log.warning(
                "hub: the broker's newest position %s (partition %d) is behind the %s this hub dispatched "
                "(it lost writes); its streams reset",
                format_id(heads[part]),
                part,
                format_id(hub.positions[part]),
            )
        channels = hub.active_channels()
        if broker.partitions > 1:
            channels = {channel for channel in channels if broker.partition(channel) in behind}
        hub.reset_channels(channels, heads, backwards=True)
        for part in behind:
            hub.positions[part] = heads[part]

    def _catch_up(self, channels):
        """Dispatch what the active streams' channels missed while the hub was away; return how many events.

        Streams on a channel with a hole get a reset first, positioned at the
        broker's head read before the history: every event up to it is in the
        history the reset covers, every later one still reaches them.
        """
        hub, broker = self.hub, self.broker
        positions = list(hub.positions)
        heads = [max(pair) for pair in zip(positions, broker.heads(), strict=True)]
        after = _after(positions)
        history = broker.history(channels, after)
        lost = holes(history, after, channels)
        if lost:
            log.warning(
                "hub: %d channels lost events while the broker was unreachable%s; their streams reset",
                len(lost),
                " (the broker lost its data)" if type(after) is int and history.epoch > after else "",
            )
            hub.reset_channels(lost, heads)
        hub.dispatch(history.events)
        return len(history.events)

    def _serve(self):
        hub = self.hub
        listener = self._listener
        interval = hub.heartbeat_interval
        liveness = hub.liveness_timeout
        next_marker = time.monotonic() + interval
        marker_sent = None
        while not hub._stop.is_set():
            self._flush(listener)
            if self._pending:
                self._activate_pending()
            now = time.monotonic()
            if now >= next_marker:
                listener.publish_marker()
                if marker_sent is None:
                    marker_sent = now
                next_marker = now + interval
            if marker_sent is not None and now - marker_sent > liveness:
                raise BrokerUnavailable(f"no marker came back within {liveness} s")
            timeout = next_marker - now
            if marker_sent is not None:
                timeout = min(timeout, marker_sent + liveness - now)
            items = listener.wait(max(timeout, 0.0))
            if items:
                if marker_sent is not None and any(getattr(i, "channel", None) == hub.hub_channel for i in items):
                    marker_sent = None
                self._handle(items)

    def _handle(self, items):
        """Dispatch what one read brought, in order: confirmations, events (in batches) and trim notices."""
        hub = self.hub
        batch = []  # everything one wake-up brought is dispatched under one lock
        for item in items:
            kind = type(item)
            if kind is Subscribed:
                self._confirm(item.channel)
            elif kind is Trimmed:
                hub.dispatch(batch)
                batch = []
                # The event at item.pos cannot be read any more: its streams skip it after a reset.
                positions = list(hub.positions)
                part = self.broker.partition(item.channel)
                positions[part] = max(item.pos, positions[part])
                hub.reset_channels([item.channel], positions)
            else:
                batch.append(item)
        if batch:
            hub.dispatch(batch)

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
        """Start every pending subscription whose channels are confirmed: its replay first, then live events.

        One ``last_position`` and one ``history`` call serve the whole batch.
        """
        with self._lock:
            confirmed = self._confirmed
            waiting, ready = [], []
            for entry in self._pending:
                if entry[0].closed is None:
                    (ready if all(channel in confirmed for channel in entry[0].channels) else waiting).append(entry)
            self._pending = waiting
            if not ready:
                return
        try:
            # Channels are confirmed: every event after this head arrives live,
            # and the history read below covers the head up to the read.
            broker = self.broker
            heads = [max(pair) for pair in zip(self.hub.positions, broker.heads(), strict=True)]
            ttl_ms = broker.history_ttl * 1000
            starts = [_start(sub, last_event_id, heads, ttl_ms) for sub, last_event_id in ready]
            channels = {channel for sub, _ in ready for channel in sub.channels}
            after = list(heads)  # per partition, the earliest start of a stream reading it
            for (sub, _), (start, _) in zip(ready, starts, strict=True):
                for part in sub.parts:
                    after[part] = min(after[part], start if type(start) is int else start[part])
            history = broker.history(channels, _after(after))
        except BaseException:
            with self._lock:
                self._pending.extend(ready)  # retried after the reconnection
            raise
        by_channel = defaultdict(list)
        for event in history.events:
            by_channel[event.channel].append(event)
        plans = []
        for (sub, _), (start, reset) in zip(ready, starts, strict=True):
            events = self._replay(sub, by_channel, start, history.epoch)
            if events is None:
                start, reset = sub.cursor(heads), TRIMMED
                events = self._replay(sub, by_channel, start, history.epoch)
            plans.append((sub, start, reset, events))
        self.hub.start_all(plans)

    def _replay(self, sub, by_channel, start, epoch):
        if type(start) is int:
            return replay(sub.channels, by_channel, start, epoch[sub.part] if type(epoch) is tuple else epoch)
        return replay_parts(sub.channels, self.broker.partition, by_channel, start, epoch)


def _start(sub, last_event_id, heads, ttl_ms):
    """``(start, reset)`` of ``sub`` (``myapp.resume``): an int for one partition, a dict for several."""
    if len(sub.parts) == 1:
        return start_position(last_event_id, head=heads[sub.part], ttl_ms=ttl_ms)
    return start_positions(last_event_id, heads=heads, parts=sub.parts, ttl_ms=ttl_ms)


def _after(positions):
    """What ``Broker.history`` takes for the hub's ``positions``: an int for one partition, else a tuple."""
    return positions[0] if len(positions) == 1 else tuple(positions)
