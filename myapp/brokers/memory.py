"""The in-memory broker: the reference implementation of the broker contract.

Everything lives in this process, under one lock:

- a position counter (``myapp.ids``): the wall clock in milliseconds, plus a
  sequence number when two events share a millisecond or the clock steps back;
- per channel, a deque of ``(event, previous position in the channel)``,
  trimmed to ``history_length`` events and ``history_ttl`` seconds (keeping
  at least the newest) on every publish to that channel;
- idempotency keys (``idempotency_key=``), remembered for ``history_ttl`` seconds;
- the open listeners, each with a queue that ``publish`` fills while holding
  the lock, so every listener sees events in position order.

Use it for tests and ``runserver``. Events never leave the process, so it
cannot serve more than one gunicorn worker (a system check says so).
"""

import queue
import threading
import time
from collections import deque

from myapp.events import Event
from myapp.ids import milliseconds, position

from .base import Broker, History, Listener, Subscribed

__all__ = ["MemoryBroker"]

_WAKE = object()


class MemoryBroker(Broker):
    supports_multiple_processes = False

    def __init__(self, **options):
        super().__init__(**options)
        self._lock = threading.Lock()
        self._last = 0
        self._channels = {}  # channel -> deque of (Event, previous position)
        self._keys = {}  # (channel, key) -> (position, expiry in time.monotonic seconds)
        self._listeners = set()
        self._presence = {}  # key -> {(hub, member): count}
        self._alive = {}  # hub -> time.monotonic() until which it counts

    def _next_position(self):
        self._last = max(self._last + 1, position(int(time.time() * 1000)))
        return self._last

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        key = idempotency_key
        with self._lock:
            now = time.monotonic()
            if key is not None:
                found = self._keys.get((channel, key))
                if found is not None and found[1] > now:
                    return found[0]
            pos = self._next_position()
            event = Event(channel, pos, event_type, data)
            entries = self._channels.setdefault(channel, deque())
            entries.append((event, entries[-1][0].pos if entries else 0))
            self._trim(channel, entries, pos)
            if key is not None:
                self._keys[(channel, key)] = (pos, now + self.history_ttl)
                if len(self._keys) > 4 * len(self._channels) + 1000:
                    self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
            for listener in self._listeners:
                listener._deliver(event)
            return pos

    def _trim(self, channel, entries, newest):
        while len(entries) > self.history_length:
            entries.popleft()
        oldest_ms = milliseconds(newest) - self.history_ttl * 1000
        # The newest entry stays even when old (the clock may step back); the
        # stream's age rule covers positions older than history_ttl.
        while len(entries) > 1 and milliseconds(entries[0][0].pos) < oldest_ms:
            entries.popleft()

    def last_position(self):
        with self._lock:
            return self._last

    def history(self, channels, after):
        with self._lock:
            events, trimmed = [], set()
            for channel in set(channels):
                retained = [entry for entry in self._channels.get(channel, ()) if entry[0].pos > after]
                if retained and retained[0][1] > after:
                    trimmed.add(channel)
                events.extend(
                    Event(event.channel, event.pos, event.event_type, event.data, prev) for event, prev in retained
                )
        events.sort(key=lambda event: event.pos)
        return History(events, frozenset(trimmed))

    def presence_update(self, hub_id, counts, ttl):
        with self._lock:
            for (key, member), count in counts.items():
                entries = self._presence.setdefault(key, {})
                if count:
                    entries[(hub_id, member)] = count
                else:
                    entries.pop((hub_id, member), None)
                    if not entries:
                        del self._presence[key]
            self._alive[hub_id] = time.monotonic() + ttl

    def presence_read(self, key, *, exclude=None):
        now = time.monotonic()
        totals = {}
        with self._lock:
            for (hub, member), count in self._presence.get(key, {}).items():
                if hub != exclude and self._alive.get(hub, 0) > now:
                    totals[member] = totals.get(member, 0) + count
        return {member: count for member, count in totals.items() if count}

    def close(self):
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener.close()


class MemoryListener(Listener):
    def __init__(self, broker, hub_channel):
        self._broker = broker
        self._hub_channel = hub_channel
        self._channels = set()
        self._queue = queue.SimpleQueue()
        self._closed = False
        with broker._lock:
            broker._listeners.add(self)
        self.subscribe([hub_channel])

    def _deliver(self, event):
        if event.channel in self._channels:
            self._queue.put(event)

    def subscribe(self, channels):
        with self._broker._lock:
            self._check_open()
            self._channels.update(channels)
            for channel in channels:
                self._queue.put(Subscribed(channel))

    def unsubscribe(self, channels):
        with self._broker._lock:
            self._check_open()
            self._channels.difference_update(channels)

    def wait(self, timeout):
        self._check_open()
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._check_open()
        return [item for item in items if item is not _WAKE]

    def wakeup(self):
        self._queue.put(_WAKE)

    def publish_marker(self):
        broker = self._broker
        with broker._lock:
            self._check_open()
            event = Event(self._hub_channel, broker._next_position(), "marker", "")
            for listener in broker._listeners:
                listener._deliver(event)

    def _check_open(self):
        if self._closed:
            from myapp.exceptions import BrokerUnavailable

            raise BrokerUnavailable("the memory listener was closed")

    def close(self):
        with self._broker._lock:
            self._closed = True
            self._broker._listeners.discard(self)
        self._queue.put(_WAKE)


MemoryBroker.listener_class = MemoryListener
