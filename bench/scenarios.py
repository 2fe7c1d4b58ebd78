"""The benchmark scenarios. Each takes a ``Context`` and sizes and returns one result dict.

Every result carries ``scenario``, ``streams`` (N), ``problems`` (list of
str: lost or duplicate events, streams that failed; empty when clean) and its
figures, with the unit in each key name: ``_ms`` milliseconds, ``_s``
seconds, ``_us`` microseconds, ``_kb`` kibibytes, ``_per_s`` per second.
Percentile dicts have keys p50, p99 and max.

- ``hold``: N idle streams; worker memory per stream, idle CPU, /healthz latency.
- ``broadcast``: N streams on one channel, M events; delivery latency,
  fan-out completion, deliveries per second, worker CPU per delivery.
- ``per-user``: N streams on N channels, M events spread over them; same figures.
- ``connect-storm``: N clients connect at once; time until all are live, errors.
- ``send-event``: publish latency from this process, no streams.
- ``limit`` (baseline only): open streams in steps until the first error.
"""

import http.client
import json
import time
from time import perf_counter_ns, time_ns

import numpy as np

__all__ = ["SCENARIOS", "Context", "percentiles"]


class Context:
    """What the scenarios drive and measure.

    target: "redis", "postgres" or "baseline".
    stack: the ``bench.servers.Stack``.
    clients: the ``bench.loadgen.Clients``.
    stream_path: callable(channel str) -> request path (bytes) with a token.
    publish: callable(channel, event_type, data str): publish one event.
    send_event: callable(seq int): one application-level publish (send_event).
    options: the parsed command-line options (argparse.Namespace).
    log: callable(str) for progress lines.
    """

    def __init__(self, *, target, stack, clients, stream_path, publish, send_event, options, log):
        self.target = target
        self.stack = stack
        self.clients = clients
        self.stream_path = stream_path
        self.publish = publish
        self.send_event = send_event
        self.options = options
        self.log = log

    @property
    def heartbeat(self):
        """The stream heartbeat interval in seconds (float)."""
        return float(self.options.heartbeat or 15.0)


def percentiles(values, scale=1.0):
    """Return {"p50", "p99", "max", "mean", "count"} of ``values`` times ``scale`` (None values if empty)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {"p50": None, "p99": None, "max": None, "mean": None, "count": 0}
    data = data * scale
    p50, p99 = np.percentile(data, [50, 99])
    return {
        "p50": round(float(p50), 4),
        "p99": round(float(p99), 4),
        "max": round(float(data.max()), 4),
        "mean": round(float(data.mean()), 4),
        "count": int(data.size),
    }


def _quantiles(values, scale=1.0, points=101):
    """Return ``points`` evenly spaced quantiles (for the report's CDF plot)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return []
    return [round(float(v), 4) for v in np.quantile(data * scale, np.linspace(0, 1, points))]


def _pad(size):
    return "x" * max(0, size)


# -- helpers -------------------------------------------------------------------


def _open(ctx, count, channel_names, *, events=0, concurrency=None, storm=False):
    """Open ``count`` streams; stream k reads channel_names[k % len]. Return the loadgen's open report."""
    paths = {}
    streams = []
    channels = len(channel_names)
    for k in range(count):
        index = k % channels
        path = paths.get(index)
        if path is None:
            path = paths[index] = ctx.stream_path(channel_names[index])
        streams.append((index, path))
    options = ctx.options
    opened = ctx.clients.open(
        streams,
        events=events,
        channels=channels,
        concurrency=None if storm else (concurrency or options.concurrency),
        timeout=options.storm_timeout if storm else options.open_timeout,
        start_ns=time_ns() + 300_000_000 if storm else None,
    )
    return opened


def _settle(ctx, timeout=None):
    """Close every stream and wait until the workers let go of them (no client connection left).

    The server notices a closed client only at its next write (a heartbeat),
    so this waits up to about one heartbeat interval. Return seconds waited.
    """
    ctx.clients.close(reset=True)
    started = time.monotonic()
    timeout = timeout if timeout is not None else 2 * ctx.heartbeat + 10
    while time.monotonic() - started < timeout:
        held = sum(ctx.stack.worker_clients())
        if held == 0:
            break
        time.sleep(0.25)
    else:
        ctx.log(f"  workers still hold {held} client connections after {timeout:.0f} s")
    if ctx.options.verbose:
        ctx.log(f"  settled: broker connections {ctx.stack.broker_connections()}")
    return round(time.monotonic() - started, 2)


def _healthz(ctx, count, seconds):
    """GET /healthz ``count`` times, sequentially, spread over ``seconds``; return latencies in ms."""
    latencies = []
    errors = 0
    interval = seconds / max(count, 1)
    for _ in range(count):
        began = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(ctx.stack.host, ctx.stack.port, timeout=10)
            connection.request("GET", "/healthz", headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                errors += 1
        except OSError:
            errors += 1
        elapsed = time.perf_counter() - began
        latencies.append(elapsed * 1000)
        if interval > elapsed:
            time.sleep(interval - elapsed)
    return latencies, errors


def _gc_pauses(ctx, tries=40):
    """Each worker's garbage-collection pauses so far, from /healthz (``myapp.gcwatch``): {pid: {generation: {...}}}.

    /healthz is answered by whichever worker accepts the connection, so this
    asks until every worker answered (or ``tries`` requests went by).
    """
    found = {}
    workers = len(ctx.stack.workers_processes())
    for _ in range(tries):
        try:
            connection = http.client.HTTPConnection(ctx.stack.host, ctx.stack.port, timeout=10)
            connection.request("GET", "/healthz", headers={"Connection": "close"})
            body = json.loads(connection.getresponse().read())
            connection.close()
        except (OSError, ValueError):
            continue
        gc_stats = body.get("gc") or {}
        found[body["pid"]] = {name: value for name, value in gc_stats.items() if name.startswith("generation")}
        if len(found) >= workers:
            break
    return found


def _open_problems(opened, what="streams"):
    if opened["errors"]:
        failed = opened["attempted"] - opened["live"]
        return [f"{failed} of {opened['attempted']} {what} failed to open: {opened['errors']}"]
    return []


def _open_figures(opened):
    seconds = (opened["last_live_ns"] - opened["started_ns"]) / 1e9 if opened["live"] else None
    return {
        "streams_live": opened["live"],
        "open_errors": opened["errors"],
        "open_s": round(seconds, 3) if seconds is not None else None,
        "opens_per_s": round(opened["live"] / seconds, 1) if seconds else None,
        "connect_to_live_ms": percentiles(opened["to_live_ms"]),
    }


# -- scenarios -----------------------------------------------------------------


def hold(ctx, streams):
    """N idle streams: memory per stream, idle CPU (heartbeats included), /healthz latency."""
    options = ctx.options
    stack = ctx.stack
    rss_before = stack.worker_rss_bytes()
    ctx.log(f"  opening {streams} streams")
    opened = _open(ctx, streams, ["bench:hold"])
    problems = _open_problems(opened)
    time.sleep(min(2.0, options.idle_seconds))  # let the last requests finish and greenlets settle
    rss_after = stack.worker_rss_bytes()
    per_worker = stack.worker_clients()
    broker_connections = stack.broker_connections()
    live = max(opened["live"], 1)

    ctx.log(f"  idle for {options.idle_seconds:.0f} s")
    comments_before = ctx.clients.status()["comments"]
    cpu_before, broker_before, began = stack.worker_cpu_seconds(), stack.broker_cpu_seconds(), time.monotonic()
    time.sleep(options.idle_seconds)
    elapsed = time.monotonic() - began
    idle_cpu = (stack.worker_cpu_seconds() - cpu_before) / elapsed
    broker_idle_cpu = (stack.broker_cpu_seconds() - broker_before) / elapsed
    comments = ctx.clients.status()["comments"] - comments_before

    ctx.log(f"  {options.healthz_requests} x GET /healthz over {options.healthz_seconds:.0f} s")
    healthz, healthz_errors = _healthz(ctx, options.healthz_requests, options.healthz_seconds)
    status = ctx.clients.status()
    if status["dropped_by_server"] or status["ended"]:
        problems.append(f"{status['ended']} streams ended during the hold: {status['errors']}")
    if healthz_errors:
        problems.append(f"{healthz_errors} /healthz requests failed")
    settle_s = _settle(ctx)
    gc_pauses = _gc_pauses(ctx)
    return {
        "scenario": "hold",
        "streams": streams,
        **_open_figures(opened),
        "rss_per_stream_kb": round((rss_after - rss_before) / live / 1024, 2),
        "worker_rss_mb": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
        "streams_per_worker": per_worker,
        "broker_connections": broker_connections,
        "heartbeat_s": ctx.heartbeat,
        "idle_s": round(elapsed, 1),
        "idle_cpu_s_per_s": round(idle_cpu, 5),
        "idle_cpu_us_per_stream_per_s": round(idle_cpu / live * 1e6, 3),
        "broker_idle_cpu_s_per_s": round(broker_idle_cpu, 5),
        "heartbeats_per_stream": round(comments / live, 2),
        "healthz_ms": percentiles(healthz),
        "healthz_errors": healthz_errors,
        "dropped_during_hold": status["ended"],
        "settle_s": settle_s,
        # Since the workers started: the warm-up, this scenario's opening, idling and closing.
        "gc_max_pause_ms": max((g["max_ms"] for worker in gc_pauses.values() for g in worker.values()), default=None),
        "gc_pauses": gc_pauses,
        "problems": problems,
    }


def _publish(ctx, channel_names, first, count, rate, pad):
    """Publish events ``first`` .. ``first + count - 1`` at ``rate`` per second (0: unpaced).

    Return (sent_ns: publish start times in ns, one per event; publish_ms:
    each publish call's duration in ms; seconds the loop took).
    """
    channels = len(channel_names)
    sent_ns = []
    publish_ms = []
    began = time.perf_counter()
    for index in range(count):
        seq = first + index
        sent = time_ns()
        sent_ns.append(sent)
        data = json.dumps({"seq": seq, "t": sent, "pad": pad}, separators=(",", ":"))
        ctx.publish(channel_names[seq % channels], "bench", data)
        publish_ms.append((time_ns() - sent) / 1e6)
        if rate:
            delay = began + (index + 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    return sent_ns, publish_ms, time.perf_counter() - began


class _Meter:
    """CPU seconds of the workers, the broker server and the load generators over a phase."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.start = self._read()

    def _read(self):
        ctx = self.ctx
        return ctx.stack.worker_cpu_seconds(), ctx.stack.broker_cpu_seconds(), ctx.clients.cpu_seconds()

    def per_delivery(self, deliveries):
        """Return {worker,broker,loadgen}_cpu_us_per_delivery (µs) and worker_cpu_s since construction."""
        worker, broker, loadgen = (after - before for after, before in zip(self._read(), self.start, strict=True))

        def us(seconds):
            return round(seconds / deliveries * 1e6, 2) if deliveries else None

        return {
            "worker_cpu_s": round(worker, 3),
            "worker_cpu_us_per_delivery": us(worker),
            "broker_cpu_us_per_delivery": us(broker),
            "loadgen_cpu_us_per_delivery": us(loadgen),
        }


def _deliver(ctx, scenario, streams, channel_names, events, rate):
    """Open streams on ``channel_names``; publish ``events`` at ``rate``/s, then a burst; measure both.

    Phase 1 (paced) gives latency, fan-out completion and CPU per delivery;
    phase 2 publishes ``--burst-events`` more without pacing and gives the
    throughput (deliveries per second) and CPU per delivery under load.
    """
    options = ctx.options
    burst = options.burst_events if options.burst_events is not None else events
    ctx.log(f"  opening {streams} streams on {len(channel_names)} channel(s)")
    opened = _open(ctx, streams, channel_names, events=events + burst)
    problems = _open_problems(opened)
    pad = _pad(options.payload - 40)
    profiler = None
    if options.profile:
        from pathlib import Path

        from bench.profile import Profiler

        output = Path(options.out) / "profiles" / f"{ctx.target}-{scenario}-{streams}.txt"
        worker = ctx.stack.workers_processes()[0].pid
        seconds = events / rate if rate else 10.0
        profiler = Profiler(worker, output, seconds, native=options.profile == "native")

    ctx.log(f"  publishing {events} events at {rate:g}/s")
    meter = _Meter(ctx)
    sent_ns, publish_ms, publish_s = _publish(ctx, channel_names, 0, events, rate, pad)
    paced = ctx.clients.collect(events, timeout=options.collect_timeout)
    deliveries = len(paced["latencies_ns"])
    cpu = meter.per_delivery(deliveries)
    latencies = np.frombuffer(paced["latencies_ns"], dtype=np.int64) if deliveries else []
    complete_ms = [(last - sent) / 1e6 for last, sent in zip(paced["last_ns"], sent_ns, strict=True) if last]
    result = {
        "scenario": scenario,
        "streams": streams,
        "channels": len(channel_names),
        "events": events,
        "rate_per_s": rate,
        **_open_figures(opened),
        "deliveries": deliveries,
        "latency_ms": percentiles(latencies, 1e-6),
        "latency_quantiles_ms": _quantiles(latencies, 1e-6),
        "fanout_complete_ms": percentiles(complete_ms),
        "publish_s": round(publish_s, 3),
        "publish_ms": percentiles(publish_ms),
        **cpu,
    }
    final = paced
    if burst:
        ctx.log(f"  burst: {burst} events unpaced")
        meter = _Meter(ctx)
        sent_ns, _, burst_s = _publish(ctx, channel_names, events, burst, 0, pad)
        final = ctx.clients.collect(events + burst, timeout=options.collect_timeout)
        burst_deliveries = len(final["latencies_ns"])
        last = max(final["last_ns"], default=0)
        span_s = (last - sent_ns[0]) / 1e9 if last else None
        burst_cpu = meter.per_delivery(burst_deliveries)
        result.update(
            burst_events=burst,
            burst_publish_per_s=round(burst / burst_s, 1) if burst_s else None,
            burst_deliveries=burst_deliveries,
            deliveries_per_s=round(burst_deliveries / span_s, 1) if span_s else None,
            burst_latency_ms=percentiles(np.frombuffer(final["latencies_ns"], dtype=np.int64), 1e-6),
            burst_worker_cpu_us_per_delivery=burst_cpu["worker_cpu_us_per_delivery"],
            burst_loadgen_cpu_us_per_delivery=burst_cpu["loadgen_cpu_us_per_delivery"],
        )
    for key, what in (("lost", "lost"), ("dups", "duplicate"), ("misrouted", "misrouted"), ("malformed", "malformed")):
        if final[key]:
            problems.append(f"{final[key]} {what} events")
    if final["lost"]:
        problems.append(f"{final['streams_with_loss']} streams missed events")
    if final["ended"]:
        problems.append(f"{final['ended']} streams ended early: {final['errors']}")
    result.update(
        expected_deliveries=final["expected"],
        lost=final["lost"],
        dups=final["dups"],
        reordered=final["reordered"],
        settle_s=_settle(ctx),
        profile=profiler.finish() if profiler is not None else None,
        problems=problems,
    )
    return result


def broadcast(ctx, streams):
    """N streams on one channel, M events: latency, fan-out completion, throughput, CPU per delivery."""
    options = ctx.options
    events = options.events if options.events else max(20, min(200, 200_000 // streams))
    rate = options.rate if options.rate is not None else max(1.0, min(100.0, 10_000 / streams))
    return _deliver(ctx, "broadcast", streams, ["bench:all"], events, rate)


def per_user(ctx, streams):
    """N streams on N private channels, M events spread over them (event i to channel i % N)."""
    options = ctx.options
    events = max(options.events or 200, streams)
    rate = options.user_rate
    return _deliver(ctx, "per-user", streams, [f"bench:u{k}" for k in range(streams)], events, rate)


def connect_storm(ctx, streams):
    """N clients connect at once (no concurrency limit): time until all are live, errors."""
    stack = ctx.stack
    ctx.log(f"  {streams} clients connecting at once")
    cpu_before = stack.worker_cpu_seconds()
    opened = _open(ctx, streams, ["bench:storm"], storm=True)
    worker_cpu = stack.worker_cpu_seconds() - cpu_before
    start_ns = opened["started_ns"]
    all_live_s = (opened["last_live_ns"] - start_ns) / 1e9 if opened["live"] == streams else None
    settle_s = _settle(ctx)
    return {
        "scenario": "connect-storm",
        "streams": streams,
        **_open_figures(opened),
        "all_live_s": round(all_live_s, 3) if all_live_s is not None else None,
        "errors": sum(opened["errors"].values()),
        "worker_cpu_us_per_connection": round(worker_cpu / max(opened["live"], 1) * 1e6, 1),
        "settle_s": settle_s,
        # Connection errors are a measured figure here, not a broken run.
        "problems": [],
    }


def send_event(ctx, count):
    """``count`` sequential publishes from this process through send_event; latency in ms."""
    for seq in range(min(50, count)):  # warm up connections and scripts
        ctx.send_event(seq)
    latencies = []
    for seq in range(count):
        began = perf_counter_ns()
        ctx.send_event(seq)
        latencies.append((perf_counter_ns() - began) / 1e6)
    return {
        "scenario": "send-event",
        "streams": 0,
        "count": count,
        "send_event_ms": percentiles(latencies),
        "problems": [],
    }


def limit(ctx, maximum, step=25):
    """Open streams ``step`` at a time (up to ``maximum``) until one fails; report where."""
    total = 0
    first_error_at = None
    errors = {}
    while total < maximum:
        opened = _open(ctx, step, ["bench:limit"], concurrency=step)
        total += step
        if opened["errors"]:
            first_error_at = total - step + opened["live"] + 1
            errors = opened["errors"]
            break
    issues = ctx.stack.log_issues()
    settle_s = _settle(ctx)
    return {
        "scenario": "limit",
        "streams": total,
        "first_error_at": first_error_at,
        "errors": errors,
        "server_log": issues,
        "settle_s": settle_s,
        "problems": [],
    }


SCENARIOS = {
    "hold": hold,
    "broadcast": broadcast,
    "per-user": per_user,
    "connect-storm": connect_storm,
}
