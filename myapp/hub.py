"""The hub: one broker subscription per process, fanned out to every stream.

One ``Hub`` per worker process owns one ``Listener`` (one broker connection)
in its own greenlet. Streams ask it for a ``myapp.subscription.Subscription``:
the hub subscribes a channel at the broker when its first local subscriber
arrives and drops it when the last one leaves (reference counting), and
offers each event to every subscription on its channel (a direct write to an
idle stream's socket, or its bounded queue). The event's SSE frame is encoded
once, in the ``Event``, and shared.

Starting a stream needs no broker call from the stream itself: the hub
activates new subscriptions in its own greenlet, in batches. Once the broker
confirmed a subscription's channels, the hub reads their history after the
stream's start position (one read for the whole batch; the policy is
``myapp.resume``), queues that replay, and only then lets live events in. A
fresh stream on channels the hub already holds starts at once, at the hub's
position.

Threads: the hub runs three (greenlets under gunicorn's gevent worker, real
threads under ``runserver``): the listener, heartbeats, and hang-ups (which
closes a stream as soon as its client closes the connection, see
``myapp.hangups``). Hub state is guarded by one lock and nothing blocks
while holding it.

Faults: when the broker connection fails, the hub logs once, reconnects with
jittered exponential backoff, re-subscribes every channel it holds, and
replays from the broker's history whatever was published since the last
position it dispatched, so open streams go on without a gap. A stream whose
channel lost events meanwhile (trimmed from the history, or the broker lost
its data) gets ``stream.reset`` (reason ``trimmed``) before anything after
the hole, and goes on live. While disconnected, ``subscribe`` raises
``BrokerUnavailable`` at once.

Liveness: every ``heartbeat_interval`` seconds the hub publishes a marker on
its private channel through its own listener; a marker that does not come back
within ``liveness_timeout`` seconds means the connection is dead (e.g. a
half-open TCP connection) and the hub reconnects. Markers also tell the hub
how far the broker's order has reached, so heartbeats move idle streams'
last event id forward.
"""

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter

from myapp.brokers.base import CONTROL_CHANNEL, HUB_CHANNEL_PREFIX
from myapp.counters import Counters
from myapp.exceptions import BrokerUnavailable
from myapp.hangups import Hangups
from myapp.link import BrokerLink
from myapp.partitions import MultiSubscription
from myapp.presence import Tracker
from myapp.registry import ProcessLocal
from myapp.resume import TRIMMED
from myapp.sink import Sink
from myapp.subscription import (
    BACKLOGGED,
    DISCONNECT,
    DISCONNECTED,
    HUB_STOPPED,
    LIFETIME,
    OVERFLOW,
    SHUTDOWN,
    UNSUBSCRIBE,
    UNSUBSCRIBED,
    Heartbeat,
    Reset,
    Subscription,
    closing_frame,
)

__all__ = [
    "Hub",
    "TooManyStreams",
    "WorkerFull",
    "get_hub",
    "peek_hub",
    "shutdown",
    "reset",
    "OVERFLOW",
    "SHUTDOWN",
    "DISCONNECTED",
]

log = logging.getLogger("myapp.hub")

#: Seconds between two heartbeat slices: each slice serves an equal share of
#: the streams, so a heartbeat round never wakes every stream at once.
HEARTBEAT_SLICE_SECONDS = 0.25

#: Seconds the hang-up thread waits before it looks at the stop flag again.
_HANGUP_POLL_SECONDS = 1.0


class TooManyStreams(Exception):
    """The owner (a user) already holds ``max_streams_per_owner`` streams (on every worker and host)."""


class WorkerFull(Exception):
    """This process already holds ``max_streams`` streams; another worker may take the stream."""


class Hub:
    """The per-process fan-out from one broker listener to many streams.

    broker: a ``myapp.brokers.base.Broker``.
    heartbeat_interval: seconds between two heartbeats of a stream and between
        markers to the broker (float).
    queue_size: live events a subscription may hold before it is closed as
        too slow (int); its replay does not count.
    subscribe_timeout: seconds ``subscribe`` waits for the broker to confirm.
    liveness_timeout: seconds a marker may take to come back before the
        connection counts as dead.
    max_streams_per_owner: streams one owner (a user) may hold in this
        process, or None for no limit.
    reconnect_delay: (first, max) seconds between reconnection attempts.
    send_timeout: seconds an owned stream's socket may stay full before the
        stream is dropped (on TCP the kernel's TCP_USER_TIMEOUT, set by the
        view, usually drops it first).
    presence_channels: fnmatch patterns of the channels whose presence is
        tracked (``myapp.presence``); presence_events: announce joins and leaves.
    max_streams: streams this process may hold (int), or None for no limit:
        adopted streams leave gunicorn's ``worker_connections``, so this is
        what bounds a worker's streams besides its file-descriptor limit.
    """

    def __init__(
        self,
        broker,
        *,
        heartbeat_interval=15.0,
        queue_size=1000,
        subscribe_timeout=5.0,
        liveness_timeout=10.0,
        max_streams_per_owner=None,
        reconnect_delay=(0.1, 5.0),
        send_timeout=30.0,
        presence_channels=(),
        presence_events=False,
        max_streams=None,
    ):
        self.broker = broker
        self.heartbeat_interval = heartbeat_interval
        self.queue_size = queue_size
        self.subscribe_timeout = subscribe_timeout
        self.liveness_timeout = liveness_timeout
        self.max_streams_per_owner = max_streams_per_owner
        self.reconnect_delay = reconnect_delay
        self.send_timeout = send_timeout
        self.max_streams = max_streams
        self.pid = os.getpid()
        self.hub_channel = f"{HUB_CHANNEL_PREFIX}{self.pid}-{uuid.uuid4().hex[:12]}"

        self._lock = threading.Lock()
        self._channels = {}  # channel -> set of active Subscriptions (those receiving live events)
        self._subscriptions = set()  # every open subscription
        self._owners = Counter()
        # The newest broker position dispatched, per partition (list of int;
        # one entry for a single-order broker, see myapp.ids).
        self.positions = [0] * broker.partitions
        slices = max(1, round(heartbeat_interval / HEARTBEAT_SLICE_SECONDS))
        self._slices = [set() for _ in range(slices)]
        self._next_slice = 0
        self._hangups = Hangups()
        self._watched = {}  # Subscription -> fd watched for its client's hang-up
        self._adopted = 0  # open subscriptions whose connection the hub owns

        self._stop = threading.Event()
        self._threads = []
        self.stopped = False
        self.counters = Counters()  # plain ints, read by myapp.metrics
        self.link = BrokerLink(self)
        # Counted across workers and hosts: who is on presence channels, and
        # each user's streams for the per-user limit.
        self.presence = Tracker(
            broker,
            self.hub_channel,
            patterns=presence_channels,
            events=presence_events,
            per_user=max_streams_per_owner is not None,
            ttl=2 * heartbeat_interval,
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Start the listener, heartbeat and hang-up threads (greenlets under gevent). Return self."""
        targets = [(self.link.run, "myapp-hub"), (self._heartbeats, "myapp-heartbeat")]
        if self._hangups.available:
            targets.append((self._watch_hangups, "myapp-hangups"))
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, reason=HUB_STOPPED):
        """Close every subscription with ``reason`` and stop the hub's threads."""
        self.stopped = True
        self._stop.set()
        self.link.wakeup()
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            self._leave(subscription, reason)
        self._write_presence(force=True)  # best effort: other hosts stop counting these streams now

    @property
    def connected(self):
        """True while the broker connection is up."""
        return self.link.connected

    @property
    def outage_started(self):
        """``time.monotonic()`` when the current broker outage began, or None."""
        return self.link.outage_started

    def available(self, timeout=None):
        """Return True if the broker connection is up.

        Waits up to ``timeout`` seconds (default ``subscribe_timeout``) only
        while the hub makes its first connection; during an outage it answers
        False at once.
        """
        return self.link.available(self.subscribe_timeout if timeout is None else timeout)

    def at_limit(self, owner, elsewhere=None):
        """Return True if ``owner`` already holds ``max_streams_per_owner`` streams, on every worker and host.

        elsewhere: the owner's streams on other hubs if already read, else
        None (read from the broker: ``myapp.presence``; raise
        BrokerUnavailable if it cannot answer).
        """
        limit = self.max_streams_per_owner
        if owner is None or limit is None:
            return False
        if elsewhere is None:
            elsewhere = self.presence.remote_streams(owner)
        return self._owners[owner] + elsewhere >= limit

    def stats(self):
        """Return a dict of counts: streams, adopted (streams whose connection the hub owns), channels,
        watched (sockets watched for hang-ups), connected."""
        with self._lock:
            return {
                "streams": len(self._subscriptions),
                "adopted": self._adopted,
                "channels": self.link.channels,
                "watched": len(self._hangups),
                "connected": self.connected,
            }

    # -- streams -------------------------------------------------------------

    def subscribe(self, channels, *, last_event_id=None, owner=None, timeout=None):
        """Subscribe a new stream to ``channels`` and return its ``Subscription``.

        channels: iterable of channel names (str).
        last_event_id: the client's Last-Event-ID (str) to resume from, or
            None (or "") for a fresh stream, which starts at the hub's position.
        owner: what ``max_streams_per_owner`` counts (e.g. a user id), or None.
        timeout: seconds to wait for the broker's confirmation and the replay
            (default ``subscribe_timeout``).

        Returns once the broker confirmed every channel and the replay (the
        events after the start, at most the history's length per channel) is
        queued, so no event published after the start is missed. Where the
        Last-Event-ID cannot be resumed (``myapp.resume``), the subscription
        starts at the broker's newest position with ``reset`` set to the reason.

        Raise BrokerUnavailable if the broker is down or does not confirm in
        time; TooManyStreams if ``owner`` holds too many streams already.
        """
        timeout = self.subscribe_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self.available(timeout):
            raise BrokerUnavailable("the broker is unreachable; the hub is reconnecting")
        channels = tuple(dict.fromkeys(channels))
        subscription = self._subscription(channels, owner)
        link = self.link
        limited = owner is not None and self.max_streams_per_owner is not None
        elsewhere = self.presence.remote_streams(owner) if limited else 0
        with self._lock:
            if self.max_streams is not None and len(self._subscriptions) >= self.max_streams:
                raise WorkerFull(f"this worker holds {self.max_streams} streams (MYAPP_MAX_STREAMS_PER_WORKER)")
            if self.at_limit(owner, elsewhere):
                raise TooManyStreams(f"at most {self.max_streams_per_owner} streams per user")
            confirmed = link.want(channels)
            self._subscriptions.add(subscription)
            if owner is not None:
                self._owners[owner] += 1
            if not last_event_id and confirmed:
                # Fresh, on channels already held: every event after the hub's
                # position reaches it live, so it needs no replay.
                subscription.begin(subscription.cursor(self.positions), None)
                self._activate(subscription)
            else:
                link.pend(subscription, last_event_id)
            # The listener must act now only to send a SUBSCRIBE or to replay for
            # confirmed channels; a confirmation still on its way wakes it anyway
            # (so a storm of streams on one new channel is one wake-up, not one each).
            wake = confirmed or link.must_subscribe
        if not subscription.ready.is_set():
            if wake:
                link.wakeup()
            if not subscription.ready.wait(max(0.0, deadline - time.monotonic())):
                self._leave(subscription, UNSUBSCRIBED)
                raise BrokerUnavailable(f"the broker did not confirm the subscription within {timeout} s")
        if subscription.closed is not None:
            raise BrokerUnavailable(f"the subscription was closed: {subscription.closed}")
        return subscription

    def _subscription(self, channels, owner):
        """A new ``Subscription`` for ``channels``, or a ``MultiSubscription`` if they span partitions."""
        options = {"queue_size": self.queue_size, "lock": self._lock, "leave": self._leave, "counters": self.counters}
        broker = self.broker
        if broker.partitions == 1:
            return Subscription(channels, owner, **options)
        parts = sorted({broker.partition(channel) for channel in channels})
        if len(parts) == 1:
            return Subscription(channels, owner, part=parts[0], **options)
        return MultiSubscription(channels, owner, parts=tuple(parts), **options)

    def attach(self, subscription, *, sink=None, sock=None):
        """Tell the hub about a started stream's socket.

        sink: a ``myapp.sink.Sink`` the hub may write to while the stream is
            parked, or None (no direct writes).
        sock: the client connection's socket, watched for the client's
            hang-up (``myapp.hangups``), or None.
        """
        with self._lock:
            if subscription.closed is not None:
                return
            subscription.direct = sink
            if sock is not None:
                fd = self._hangups.watch(sock, subscription)
                if fd is not None:
                    self._watched[subscription] = fd

    def adopt(self, subscription, sock, *, chunked, retry=None, lifetime=None):
        """Take over a started stream's connection: from now on the hub writes everything to it.

        sock: a socket (``_socket.socket``) on the connection, in
            non-blocking mode, that only the hub uses and closes; the
            response head and first frames have been written.
        chunked: True if the response uses the chunked coding (HTTP/1.1),
            False for raw bytes until the connection closes (HTTP/1.0).
        retry: the reconnection delay (milliseconds) sent in the stream's
            last block.
        lifetime: seconds after which the stream ends, or None.

        Return False (and close ``sock``) if the subscription was closed
        meanwhile. See ``myapp.adoption``.
        """
        deadline = time.monotonic() + lifetime if lifetime else None
        with self._lock:
            if subscription.closed is not None:
                sock.close()
                return False
            fd = self._hangups.watch(sock, subscription)
            if fd is not None:
                self._watched[subscription] = fd
            outcome = subscription.adopt(Sink(sock, chunked=chunked), retry=retry, deadline=deadline)
            self._adopted += 1
        self._settle([(subscription, outcome)] if outcome is not None else ())
        return True

    def _settle(self, outcomes):
        """Act on what offers returned: watch backlogged sockets, close the rest with their reason."""
        for subscription, outcome in outcomes:
            if outcome == BACKLOGGED:
                with self._lock:
                    fd = self._watched.get(subscription)
                    if fd is not None and subscription.backlog_since is None:
                        subscription.backlog_since = time.monotonic()
                        self._hangups.want_write(fd, True)
            else:
                self._leave(subscription, outcome)

    def _activate(self, subscription):
        """Let live events in (call with the lock held, after its replay is queued)."""
        for channel in subscription.channels:
            holders = self._channels.get(channel)
            if holders is None:
                self._channels[channel] = {subscription}
            else:
                holders.add(subscription)
        subscription.slot = self._next_slice
        self._slices[self._next_slice].add(subscription)
        self._next_slice = (self._next_slice + 1) % len(self._slices)
        self.presence.joined(subscription)
        subscription.ready.set()

    def _leave(self, subscription, reason):
        """Close ``subscription`` with ``reason`` and release what it held. Safe to call twice.

        An owned stream ending for a reason the browser should hear (a
        deploy, its lifetime) gets its last block first; its socket is closed.
        """
        with self._lock:
            if subscription.closed is not None:
                return
            self.counters.closed(reason)
            if subscription.owned and reason not in (DISCONNECTED, OVERFLOW, UNSUBSCRIBED):
                subscription.last_words(closing_frame(reason, subscription.retry))
            owned = subscription.end(reason)
            if owned is not None:
                self._adopted -= 1
            self._subscriptions.discard(subscription)
            fd = self._watched.pop(subscription, None)
            if fd is not None:
                self._hangups.forget(fd)
            if subscription.slot is not None:
                self._slices[subscription.slot].discard(subscription)
                self.presence.left(subscription)
            owner = subscription.owner
            if owner is not None:
                self._owners[owner] -= 1
                if self._owners[owner] <= 0:
                    del self._owners[owner]
            for channel in subscription.channels:
                holders = self._channels.get(channel)
                if holders is not None:
                    holders.discard(subscription)
                    if not holders:
                        del self._channels[channel]
            wake = self.link.release(subscription.channels)
        if owned is not None:
            owned.sock.close()
            callback, subscription.on_end = subscription.on_end, None
            if callback is not None:
                callback()
        if wake:
            self.link.wakeup()

    # -- fan-out (called by the link, without the lock) --------------------------

    def active_channels(self):
        """The channels that have active streams (set of str)."""
        with self._lock:
            return set(self._channels)

    def start_all(self, plans):
        """Start subscriptions: plans are (subscription, start, reset reason or None, replay events)."""
        with self._lock:
            for subscription, start, reset, events in plans:
                if subscription.closed is None:
                    subscription.begin(start, reset, events)
                    self.counters.started(reset, len(events))
                    self._activate(subscription)

    def reset_channels(self, channels, positions, *, backwards=False):
        """Offer a TRIMMED reset to every active stream on ``channels``, at ``positions``.

        positions: the position to go on from, per partition (list of int
        indexed by partition, as ``positions``); a stream reading several
        partitions resets in the partitions of ``channels`` only.
        backwards: a position may be below what the streams sent (the broker's
        order went back, ``myapp.link.BrokerLink._check_order``).
        """
        broker = self.broker
        parts = {0} if broker.partitions == 1 else {broker.partition(channel) for channel in channels}
        resets = {part: Reset(TRIMMED, positions[part], backwards=backwards, part=part) for part in parts}
        outcomes = []
        with self._lock:
            victims = {sub for channel in channels for sub in self._channels.get(channel, ())}
            for subscription in victims:
                for part in parts.intersection(subscription.parts):
                    outcome = subscription.offer(resets[part])
                    if outcome is not None:
                        outcomes.append((subscription, outcome))
                        break
            self.counters.reset(TRIMMED, len(victims) - len(outcomes))
        self._settle(outcomes)

    def dispatch(self, events):
        """Offer each of ``events`` (ascending positions) to every subscription on its channel, under one lock."""
        outcomes = None
        controls = None
        with self._lock:
            channels = self._channels
            positions = self.positions
            for event in events:
                pos = event.pos
                part = event.part
                if pos <= positions[part]:
                    continue  # already dispatched (history and live overlap after a reconnect)
                positions[part] = pos
                holders = channels.get(event.channel)
                if holders:
                    for subscription in holders:
                        outcome = subscription.offer(event)
                        if outcome is not None:
                            outcomes = outcomes or []
                            outcomes.append((subscription, outcome))
                elif event.channel == CONTROL_CHANNEL:
                    controls = controls or []
                    controls.append(event)
        if outcomes:
            self._settle(outcomes)
        if controls:
            for event in controls:
                self._control(event)

    def _control(self, event):
        """Apply a control message (``myapp.control``): end the streams of one owner, or those carrying a channel."""
        try:
            message = json.loads(event.data)
            action, owner, channel = message["action"], str(message["owner"]), message.get("channel")
        except (ValueError, TypeError, KeyError):
            log.warning("hub: ignoring a malformed control message %r", event.data[:200])
            return
        if action not in (DISCONNECT, UNSUBSCRIBE):
            log.warning("hub: ignoring an unknown control action %r", action)
            return
        with self._lock:
            victims = [
                sub
                for sub in self._subscriptions
                if sub.owner is not None and str(sub.owner) == owner and (channel is None or channel in sub.channels)
            ]
        for subscription in victims:
            self._leave(subscription, action)
        if victims:
            log.info("hub: %s ended %d streams of user %s", action, len(victims), owner)

    # -- heartbeats and hang-ups ----------------------------------------------

    def _heartbeats(self):
        """Every slice interval, offer a heartbeat to one slice of the active streams.

        A stream that was handed an event since its slice's last turn needs
        none (its connection carried bytes and its last event id moved), so a
        stream hears something at least every two heartbeat intervals. The
        same pass ends streams past their lifetime, and owned streams whose
        socket stayed full for longer than ``send_timeout``.
        """
        step = self.heartbeat_interval / len(self._slices)
        index = 0
        try:
            while not self._stop.wait(step):
                outcomes = []
                now = time.monotonic()
                with self._lock:
                    positions = self.positions
                    beats = [None] * len(positions)  # built on first use, one per partition
                    for subscription in self._slices[index]:
                        deadline = subscription.deadline
                        if deadline is not None and now > deadline:
                            outcomes.append((subscription, LIFETIME))
                            continue
                        stalled = subscription.backlog_since
                        if stalled is not None and now - stalled > self.send_timeout:
                            outcomes.append((subscription, DISCONNECTED))
                            continue
                        if subscription.fresh:
                            subscription.fresh = False  # it had bytes since its last heartbeat: none needed
                            continue
                        part = subscription.part
                        if part < 0:
                            beat = positions  # a MultiSubscription takes every partition's
                        else:
                            beat = beats[part]
                            if beat is None:
                                beat = beats[part] = Heartbeat(positions[part])
                        outcome = subscription.offer(beat)
                        subscription.fresh = False  # the heartbeat itself does not count
                        if outcome is not None:
                            outcomes.append((subscription, outcome))
                index = (index + 1) % len(self._slices)
                if outcomes:
                    self._settle(outcomes)
                self._write_presence()
        finally:
            if not self.stopped:
                log.error("hub: heartbeat thread ended; closing all streams")
                self.stop()

    def _write_presence(self, force=False):
        """Write what changed in this hub's presence and stream counts, and renew its liveness when due."""
        tracker = self.presence
        now = time.monotonic()
        if not tracker.active or not (force or tracker.due(now, self.heartbeat_interval)):
            return
        with self._lock:
            entries = tracker.take(now)
        if not tracker.write(entries, now):
            with self._lock:
                tracker.requeue(entries)

    def _watch_hangups(self):
        """Close each stream whose client closed its connection; write owned streams' backlogs when they drain."""
        hangups = self._hangups
        try:
            while not self._stop.is_set():
                reports = hangups.wait(_HANGUP_POLL_SECONDS)
                if not reports:
                    continue
                outcomes = []
                with self._lock:
                    for fd, events in reports:
                        if hangups.is_hangup(events):
                            subscription = hangups.hung_up(fd)
                            if subscription is not None:
                                outcomes.append((subscription, DISCONNECTED))
                            continue
                        subscription = hangups.subscription(fd)
                        if subscription is None or not subscription.owned or subscription.closed is not None:
                            continue
                        outcome = subscription.flush()
                        if outcome is None:
                            hangups.want_write(fd, False)
                        elif outcome != BACKLOGGED:
                            outcomes.append((subscription, outcome))
                for subscription, outcome in outcomes:
                    self._leave(subscription, outcome)
        finally:
            hangups.close()


# -- the process's hub ---------------------------------------------------------


def _build_hub():
    from myapp import conf
    from myapp.brokers import get_broker

    return Hub(
        get_broker(),
        heartbeat_interval=conf.heartbeat_seconds(),
        queue_size=conf.setting("MYAPP_STREAM_QUEUE_SIZE"),
        subscribe_timeout=conf.setting("MYAPP_SUBSCRIBE_TIMEOUT_SECONDS"),
        max_streams_per_owner=conf.setting("MYAPP_MAX_STREAMS_PER_USER"),
        send_timeout=conf.setting("MYAPP_SEND_TIMEOUT_SECONDS"),
        presence_channels=conf.setting("MYAPP_PRESENCE_CHANNELS"),
        presence_events=conf.setting("MYAPP_PRESENCE_EVENTS"),
        max_streams=conf.setting("MYAPP_MAX_STREAMS_PER_WORKER"),
    ).start()


_hub = ProcessLocal(_build_hub, discard=lambda hub: hub.stop(HUB_STOPPED), usable=lambda hub: not hub.stopped)


def get_hub():
    """Return this process's running ``Hub``, creating and starting it on first use.

    Created lazily (never at import), so under gunicorn it starts inside the
    worker after gevent patched the process; a burst of first requests builds
    exactly one. A hub that stopped, or one inherited across ``fork``, is
    replaced (``myapp.registry``).
    """
    return _hub.get()


def peek_hub():
    """Return this process's hub if one was built here (running or stopped), else None; builds nothing."""
    return _hub.peek()


def shutdown(reason=SHUTDOWN):
    """Close every stream of this process's hub (if any) with ``reason`` and stop it.

    Called from gunicorn's SIGTERM handler (``myapp.gunicorn``) so open
    streams end at once and their browsers resume on another worker.
    """
    hub = _hub.take()
    if hub is not None:
        hub.stop(reason)


def reset():
    """Stop and forget the process's hub (used when settings change in tests)."""
    _hub.reset()
