"""Prometheus metrics for operators, summed over gunicorn's workers (``GET /metrics``).

Off unless MYAPP_METRICS_TOKEN is set; then ``myapp.views.metrics`` serves
them to a scraper that sends ``Authorization: Bearer <token>``. They need
prometheus-client (the package's ``metrics`` extra), imported only once
metrics are on. Every metric, with its type, labels and unit:
docs/deployment.md, "Metrics". Labels take values from fixed sets (a
delivery path, a reason), never a channel or a user.

Where the numbers come from:

- The hub counts in plain ints (``myapp.counters``, ``Hub.counters``): the
  fan-out hands an event to a stream in a few microseconds, and one
  increment of a multiprocess metric costs one or two. ``sync`` moves what
  changed into the metrics and sets the gauges from the hub, about once a
  second in every gunicorn worker (a greenlet that
  ``myapp.gunicorn.post_worker_init`` starts with ``start``: a scrape
  reaches one worker only, so each worker syncs on its own clock), and in
  the worker that answers a scrape, just before it answers. A scrape is
  therefore at most about ``SYNC_SECONDS`` behind the other workers.
- ``send_event`` counts its publishes and their latency directly
  (``publishing``): a publish is a broker round trip, far above what the
  metric costs.

Processes: with ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus-client is
imported (``myapp.gunicorn`` does it in gunicorn's arbiter, before workers
fork), prometheus-client runs in multiprocess mode: each process writes its
values to files in that directory and a scrape merges them
(``MultiProcessCollector``). Counters then add up every worker since the
server started, dead ones included; gauges cover live workers only
(``myapp.gunicorn.child_exit`` marks dead ones). Without it (``runserver``,
``manage.py``, the in-process tests) the metrics live in the process that
serves them. A process that is no gunicorn worker (a task worker, the
shell) counts its own publishes where no scrape sees them.
"""

import logging
import threading
import time

from myapp.conf import setting
from myapp.registry import ProcessLocal
from myapp.resume import EXPIRED, MALFORMED, TRIMMED, UNKNOWN
from myapp.subscription import (
    DISCONNECT,
    DISCONNECTED,
    HUB_STOPPED,
    LIFETIME,
    OVERFLOW,
    SHUTDOWN,
    UNSUBSCRIBE,
    UNSUBSCRIBED,
)

__all__ = [
    "SYNC_SECONDS",
    "CLOSE_REASONS",
    "RESET_REASONS",
    "HubMetrics",
    "PublishMetrics",
    "enabled",
    "publishing",
    "sync",
    "start",
    "exposition",
]

log = logging.getLogger("myapp.metrics")

#: Seconds between two syncs of a worker's hub counters into the metrics.
SYNC_SECONDS = 1.0

#: Label values of ``myapp_streams_closed_total`` (``myapp.subscription``);
#: any other reason is counted as "other".
CLOSE_REASONS = (OVERFLOW, SHUTDOWN, LIFETIME, DISCONNECTED, UNSUBSCRIBED, HUB_STOPPED, DISCONNECT, UNSUBSCRIBE)
#: Label values of ``myapp_stream_resets_total`` (``myapp.resume``).
RESET_REASONS = (MALFORMED, UNKNOWN, EXPIRED, TRIMMED)
#: Upper bounds (seconds) of the publish latency buckets: a local Redis
#: answers in well under a millisecond, a publish gives up after its
#: broker's timeouts (5 s by default).
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def enabled():
    """Return True if metrics are on (MYAPP_METRICS_TOKEN is set)."""
    return setting("MYAPP_METRICS_TOKEN") is not None


def multiprocess():
    """Return True if prometheus-client runs in multiprocess mode (it decided when it was imported)."""
    from prometheus_client import values

    return values.ValueClass._multiprocess


def _label(reason, known):
    return reason if reason in known else "other"


class PublishMetrics:
    """What ``send_event`` counts: publishes, failures and their latency (registered in ``registry``)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Histogram

        self.published = Counter(
            "myapp_events_published",
            "Events the broker accepted from send_event (and the publish API)",
            registry=registry,
        )
        self.errors = Counter(
            "myapp_publish_errors",
            "Publishes the broker did not accept (unavailable, timed out, refused)",
            registry=registry,
        )
        self.seconds = Histogram(
            "myapp_publish_seconds",
            "Seconds broker.publish took, for accepted events",
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        )


class HubMetrics:
    """The hub's metrics (registered in ``registry``) and what ``sync`` last moved into them."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        def gauge(name, documentation, mode):
            return Gauge(name, documentation, multiprocess_mode=mode, registry=registry)

        self.streams = gauge(
            "myapp_streams_open", "Streams open (subscribed to the hub), summed over workers", "livesum"
        )
        self.adopted = gauge("myapp_streams_adopted", "Open streams whose connection the hub owns", "livesum")
        self.channels = gauge(
            "myapp_channels_subscribed", "Channels subscribed at the broker, summed over workers", "livesum"
        )
        self.connected = gauge("myapp_broker_connected", "1 when every worker's broker connection is up", "livemin")
        self.delivered = Counter(
            "myapp_events_delivered",
            "Live events handed to streams: written to the socket or queued",
            ["path"],
            registry=registry,
        )
        self.replayed = Counter(
            "myapp_events_replayed", "Events replayed to streams that resumed from a Last-Event-ID", registry=registry
        )
        self.resets = Counter(
            "myapp_stream_resets", "stream.reset blocks sent, by reason", ["reason"], registry=registry
        )
        self.closes = Counter("myapp_streams_closed", "Streams closed, by reason", ["reason"], registry=registry)
        self.reconnects = Counter(
            "myapp_broker_reconnects", "Broker connections re-established after an outage", registry=registry
        )
        self.disconnected = Counter(
            "myapp_broker_disconnected_seconds",
            "Seconds workers spent without their broker connection",
            registry=registry,
        )
        # Every series exists from the start, at 0.
        self._direct = self.delivered.labels("direct")
        self._queued = self.delivered.labels("queued")
        for reason in CLOSE_REASONS:
            self.closes.labels(reason)
        for reason in RESET_REASONS:
            self.resets.labels(reason)
        self._lock = threading.Lock()
        self._counters = None  # the Counters object synced last
        self._seen = _Seen()  # its values as moved into the metrics

    def sync(self, hub):
        """Move what ``hub`` counted since the last sync into the metrics, and set the gauges from it.

        hub: the process's ``myapp.hub.Hub``, or None (no hub: gauges 0).
        A new hub (the old one stopped and was replaced) starts from zero;
        what the old one counted since the last sync is moved first.
        """
        with self._lock:
            counters = hub.counters if hub is not None else None
            if counters is not self._counters:
                if self._counters is not None:
                    self._move(self._counters, None)
                self._counters, self._seen = counters, _Seen()
            if hub is None:
                for gauge in (self.streams, self.adopted, self.channels, self.connected):
                    gauge.set(0)
                return
            self._move(counters, hub)
            stats = hub.stats()
            self.streams.set(stats["streams"])
            self.adopted.set(stats["adopted"])
            self.channels.set(stats["channels"])
            self.connected.set(1 if stats["connected"] else 0)

    def _move(self, counters, hub):
        seen = self._seen
        for metric, name in ((self._direct, "direct"), (self._queued, "queued"), (self.replayed, "replayed")):
            value = getattr(counters, name)
            if value > getattr(seen, name):
                metric.inc(value - getattr(seen, name))
                setattr(seen, name, value)
        for metric, current, moved, known in (
            (self.closes, counters.closes, seen.closes, CLOSE_REASONS),
            (self.resets, counters.resets, seen.resets, RESET_REASONS),
        ):
            for reason, value in list(current.items()):  # list(): the hub may add a reason meanwhile
                if value > moved.get(reason, 0):
                    metric.labels(_label(reason, known)).inc(value - moved.get(reason, 0))
                    moved[reason] = value
        if counters.reconnects > seen.reconnects:
            self.reconnects.inc(counters.reconnects - seen.reconnects)
            seen.reconnects = counters.reconnects
        # The hub clears outage_started before it adds the outage to the
        # counters, so reading them in the other order never counts it twice.
        outage = counters.outage_seconds
        started = hub.outage_started if hub is not None else None
        if started is not None:
            outage += max(0.0, time.monotonic() - started)
        if outage > seen.outage:
            self.disconnected.inc(outage - seen.outage)
            seen.outage = outage


class _Seen:
    """The values of one ``Counters`` already moved into the metrics."""

    __slots__ = ("direct", "queued", "replayed", "closes", "resets", "reconnects", "outage")

    def __init__(self):
        self.direct = self.queued = self.replayed = self.reconnects = 0
        self.closes = {}
        self.resets = {}
        self.outage = 0.0


def _new_registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


# One set of metrics per process (rebuilt after fork), registered in a
# registry of our own: the host's metrics in prometheus-client's default
# registry are not ours to serve.
_registry = ProcessLocal(_new_registry)
_publish = ProcessLocal(lambda: PublishMetrics(_registry.get()))
# Built on the first sync only: a process that merely publishes (a task
# worker) writes no gauge that would count as a disconnected worker.
_hub_metrics = ProcessLocal(lambda: HubMetrics(_registry.get()))


class _Publishing:
    __slots__ = ("_started",)

    def __enter__(self):
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind, value, traceback):
        metrics = _publish.get()
        if kind is None:
            metrics.published.inc()
            metrics.seconds.observe(time.perf_counter() - self._started)
        else:
            metrics.errors.inc()
        return False


class _Off:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return False


_OFF = _Off()


def publishing():
    """Return a context manager to wrap one ``broker.publish`` call in: it counts and times it if metrics are on.

    A block that ends normally counts one published event and observes its
    duration (seconds); one that raises counts a publish error (the
    exception propagates).
    """
    return _Publishing() if enabled() else _OFF


def sync(hub=None):
    """Move this process's hub counters into the metrics now (nothing if metrics are off).

    hub: the hub to read, or None for this process's hub if one was built
    (``myapp.hub.peek_hub``; none built: gauges 0).
    """
    if not enabled():
        return
    if hub is None:
        from myapp.hub import peek_hub

        hub = peek_hub()
    _hub_metrics.get().sync(hub)


_started = ProcessLocal(lambda: _start_thread())


def start():
    """Sync this process's hub every SYNC_SECONDS from now on, in a daemon thread (a greenlet under gevent).

    Builds the process's hub at once, so each worker connects to the broker
    at boot and its gauges tell the truth from the first scrape. Does
    nothing if metrics are off, or if this process already started.
    """
    if enabled():
        _started.get()


def _start_thread():
    thread = threading.Thread(target=_sync_forever, name="myapp-metrics", daemon=True)
    thread.start()
    return thread


def _sync_forever():
    from myapp.hub import get_hub

    try:
        get_hub()
    except Exception:  # noqa: BLE001 - e.g. a broker misconfiguration: streams report it, metrics go on
        log.exception("metrics: the hub could not be built")
    while True:
        time.sleep(SYNC_SECONDS)
        try:
            sync()
        except Exception:  # noqa: BLE001 - a failed sync must not end the syncing
            log.exception("metrics: sync failed")


def exposition(accept=None):
    """Return ``(body, content_type)``: every metric in the format the ``accept`` header asks for.

    accept: the scraper's Accept header (str) or None: the Prometheus text
    format 0.0.4 unless it asks for OpenMetrics or text 1.0.0
    (prometheus-client's ``choose_encoder``). This process's hub (built if
    there is none yet, as ``/healthz`` does) is synced first; in
    multiprocess mode the body merges every worker's files.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    from myapp.hub import get_hub

    _hub_metrics.get().sync(get_hub())
    _publish.get()  # its series exist before the first publish
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = _registry.get()
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
