"""The hub's counters: plain ints, bumped where things happen, read by ``myapp.metrics``.

The fan-out hands an event to a stream in a few microseconds; one increment
of a prometheus-client metric in multiprocess mode costs one or two (a lock
and an mmap write). So the hub counts in plain attributes of one
``Counters`` object (``Hub.counters``), a few tens of nanoseconds each, and
``myapp.metrics`` moves what changed into the Prometheus metrics about once
a second. Imports nothing (no prometheus-client, no Django): the counters
cost the same whether metrics are on or off.

Threads: every field is written either by one thread only (the listener's
reconnection figures) or under the hub's lock (everything else), so no
increment is lost; a reader (the metrics sync) takes no lock and may see a
value one step old, which the next sync catches up.
"""

__all__ = ["Counters"]


class Counters:
    """What one hub did since it was built (ints, seconds as a float).

    direct: events the hub wrote straight to a parked or adopted stream's
        socket (``myapp.sink``), a partial write included.
    queued: events put in a stream's queue (a busy stream, or an adopted one
        whose socket was full: its backlog flush writes them later).
    replayed: events queued as replay when a stream started (its
        Last-Event-ID was behind), not counted in ``direct`` or ``queued``.
    resets: ``{reason: count}`` of ``stream.reset`` blocks: at a stream's
        start (malformed, unknown, expired, trimmed) and in a stream after a
        hole in its channel's history (trimmed).
    closes: ``{reason: count}`` of closed subscriptions (the reasons of
        ``myapp.subscription``).
    reconnects: broker connections re-established after an outage.
    outage_seconds: seconds of the outages that ended (a reconnect); the one
        running is ``Hub.outage_started``.
    """

    __slots__ = ("direct", "queued", "replayed", "resets", "closes", "reconnects", "outage_seconds")

    def __init__(self):
        self.direct = 0
        self.queued = 0
        self.replayed = 0
        self.resets = {}
        self.closes = {}
        self.reconnects = 0
        self.outage_seconds = 0.0

    def started(self, reset, replayed):
        """Count a stream's start: ``reset`` (a reason, or None) and ``replayed`` (events queued as its replay)."""
        if reset is not None:
            self.resets[reset] = self.resets.get(reset, 0) + 1
        self.replayed += replayed

    def reset(self, reason, streams):
        """Count ``streams`` (int) resets with ``reason`` sent to open streams."""
        if streams:
            self.resets[reason] = self.resets.get(reason, 0) + streams

    def closed(self, reason):
        """Count a subscription closed with ``reason``."""
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def reconnected(self, seconds):
        """Count a reconnection that ended an outage of ``seconds``."""
        self.reconnects += 1
        self.outage_seconds += seconds
