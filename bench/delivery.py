"""Delivery figures per broker backend, measured on the real stack.

    python -m bench.delivery [--backends redis postgres] [--out DIR]

For each backend (each in a process of its own, since Django settings are
per process) it starts Valkey or PostgreSQL, gunicorn with 2 gevent workers
and the task worker, then measures:

- ``history_bytes_per_1000``: broker memory (Redis ``MEMORY USAGE`` of the
  channel's stream) or table + index growth (PostgreSQL
  ``pg_total_relation_size``) for 1,000 events of about 100 bytes of data;
- ``replay_1000_ms``: a reconnect with a Last-Event-ID 1,000 events back, from
  the request until the 1,000th replayed event arrived (median of 5);
- ``latency_ms``: ``send_event`` call to receipt on an open stream, 200 events
  20 ms apart (p50, p99, max);
- ``recovery``: the broker server is stopped and started again under an open
  stream: seconds from "the server accepts connections" until ``send_event``
  succeeds, until a new stream opens (200), and until the old stream receives
  an event published after the restart;
- ``idle_1000``: worker RSS growth for 1,000 idle streams (KB per stream, MB);
- ``job_notification_ms``: a real import job in the page (headless Chromium):
  from the job's last step (its last ``job.progress`` publish) and from its
  ``job.finished`` publish to the notification appearing in the DOM (median
  of 5 jobs).

Writes ``delivery.json`` and ``delivery.md`` to DIR (default docs/benchmarks).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import BASE, Stack
from bench.sseparse import ChunkedDecoder, SSEParser

PASSWORD = "bench-password-123"


class Stream:
    """One SSE stream on a plain socket, read by a thread: ``events`` is a list of (type, data, id, ns)."""

    def __init__(self, host, port, path, headers=()):
        self.sock = socket.create_connection((host, port), timeout=30)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream", *headers, "", ""]
        self.sock.sendall("\r\n".join(lines).encode())
        self.events = []
        self.status = None
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        head, decoder, parser = b"", ChunkedDecoder(), SSEParser()
        try:
            while chunk := self.sock.recv(1 << 16):
                now = time.time_ns()
                if self.status is None:
                    head += chunk
                    if b"\r\n\r\n" not in head:
                        continue
                    head, _, chunk = head.partition(b"\r\n\r\n")
                    self.status = int(head.split()[1])
                events = [(*event, now) for event in parser.feed(decoder.feed(chunk))]
                with self.arrived:
                    self.events.extend(events)
                    self.arrived.notify_all()
        except (OSError, ValueError):  # closed, or a non-chunked error body
            pass
        with self.arrived:
            self.status = self.status or 0
            self.arrived.notify_all()

    def wait(self, predicate, timeout=30):
        with self.arrived:
            if not self.arrived.wait_for(lambda: predicate(self.events), timeout):
                raise TimeoutError(f"waited {timeout} s; got {len(self.events)} events")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _percentiles(values):
    values = sorted(values)
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(values[-1], 3), "count": len(values)}


def _path(channel):
    from urllib.parse import quote

    from myapp.tokens import subscription_token

    return f"/events/?token={quote(subscription_token([channel], max_age=3600))}&channel={quote(channel)}"


def history_cost(stack, broker):
    channel = "bench:history-cost"
    data = json.dumps({"text": "x" * 88})
    if stack.valkey is not None:
        import redis

        client = redis.Redis.from_url(stack.valkey.url)
        for _ in range(1000):
            broker.publish(channel, "bench", data)
        return client.memory_usage(f"myapp:h:{channel}", samples=0)
    from django.db import connection

    def size():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size('myapp_postgres_event')")
            return cursor.fetchone()[0]

    before = size()
    for _ in range(1000):
        broker.publish(channel, "bench", data)
    return size() - before


def replay_time(stack, broker):
    from myapp.ids import format_id

    channel = "bench:replay"
    times = []
    for _ in range(5):
        start = broker.publish(channel, "bench", "0")
        for n in range(1000):
            broker.publish(channel, "bench", json.dumps({"n": n, "text": "x" * 80}))
        began = time.time_ns()
        stream = Stream(stack.host, stack.port, _path(channel), [f"Last-Event-ID: {format_id(start)}"])
        stream.wait(lambda events: sum(1 for e in events if e[0] == "bench") >= 1000)
        last = [e for e in stream.events if e[0] == "bench"][999][3]
        times.append((last - began) / 1e6)
        stream.close()
    return round(statistics.median(times), 1)


def latency(stack):
    from myapp.publish import send_event

    stream = Stream(stack.host, stack.port, _path("bench:latency"))
    stream.wait(lambda events: any(e[0] == "stream.open" for e in events))
    for n in range(200):
        send_event("bench:latency", "bench", {"n": n, "t": time.time_ns()})
        time.sleep(0.02)
    stream.wait(lambda events: sum(1 for e in events if e[0] == "bench") >= 200)
    stream.close()
    return _percentiles([(e[3] - json.loads(e[1])["t"]) / 1e6 for e in stream.events if e[0] == "bench"])


def recovery(stack):
    from myapp.exceptions import BrokerUnavailable
    from myapp.publish import send_event

    channel = "bench:recovery"
    old = Stream(stack.host, stack.port, _path(channel))
    old.wait(lambda events: any(e[0] == "stream.open" for e in events))
    server = stack.valkey or stack.postgres
    server.stop()
    server.start()
    ready = time.monotonic()
    figures = {}
    while True:
        try:
            send_event(channel, "bench", "after")
            figures["publish_ok_s"] = round(time.monotonic() - ready, 3)
            break
        except BrokerUnavailable:
            time.sleep(0.01)
    while True:
        probe = Stream(stack.host, stack.port, _path("bench:recovery-probe"))
        probe.wait(lambda events, probe=probe: probe.status is not None, timeout=15)
        probe.close()
        if probe.status == 200:
            figures["new_stream_ok_s"] = round(time.monotonic() - ready, 3)
            break
        time.sleep(0.01)
    old.wait(lambda events: any(e[1] == '"after"' for e in events), timeout=30)
    figures["old_stream_received_s"] = round(time.monotonic() - ready, 3)
    old.close()
    return figures


def idle_streams(stack, count=1000):
    before = stack.worker_rss_bytes()
    streams = [Stream(stack.host, stack.port, _path("bench:idle")) for _ in range(count)]
    for stream in streams:
        stream.wait(lambda events: any(e[0] == "stream.open" for e in events))
    time.sleep(2)  # let the workers settle (heartbeats, allocator)
    grown = stack.worker_rss_bytes() - before
    for stream in streams:
        stream.close()
    return {"streams": count, "rss_kb_per_stream": round(grown / count / 1024, 1), "rss_mb": round(grown / 2**20, 1)}


def job_notification(stack, broker):
    from playwright.sync_api import sync_playwright

    from myapp.ids import milliseconds

    manage = [sys.executable, str(BASE / "manage.py")]
    user = [*manage, "demo_user", "--username", "bench", "--password", PASSWORD]
    subprocess.run(user, env=stack.env, check=True, cwd=BASE)
    worker = subprocess.Popen(
        [*manage, "db_worker", "--interval", "0.05", "--no-reload", "--no-startup-delay"],
        env=stack.env,
        cwd=BASE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from_last_step, from_finished = [], []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page()
            page.goto(stack.url + "/")
            page.fill("#id_username", "bench")
            page.fill("#id_password", PASSWORD)
            page.click("#login")
            page.wait_for_selector('#connection[data-state="live"]')
            channel = page.get_attribute("#page", "data-channel")
            page.evaluate(
                """() => { window.noticed = [];
                new MutationObserver(() => window.noticed.push(Date.now()))
                    .observe(document.getElementById("notices"), {childList: true}); }"""
            )
            for run in range(5):
                after = broker.last_position()
                source = "\n".join(f"Bench {run}-{n},bench-{run}-{n}-{time.time_ns()}@example.com" for n in range(4))
                page.fill("#source", source)
                page.click("#start")
                page.wait_for_function(f"window.noticed.length >= {run + 1}", timeout=60000)
                noticed = page.evaluate(f"window.noticed[{run}]")
                events = broker.history([channel], after).events
                last_step = [e for e in events if e.event_type == "job.progress"][-1]
                done = [e for e in events if e.event_type == "job.finished"][-1]
                from_last_step.append(noticed - milliseconds(last_step.pos))
                from_finished.append(noticed - milliseconds(done.pos))
            browser.close()
    finally:
        worker.terminate()
        worker.wait(20)
    return {
        "from_last_step_ms": round(statistics.median(from_last_step), 1),
        "from_finished_publish_ms": round(statistics.median(from_finished), 1),
        "runs": len(from_finished),
    }


def measure(backend):
    directory = Path(tempfile.mkdtemp(prefix=f"delivery-{backend}-"))
    os.chmod(directory, 0o755)
    stack = Stack(directory, backend=backend, workers=2)
    stack.start()
    try:
        os.environ.update(stack.env)
        # Playwright's sync API keeps an event loop in this thread; the ORM calls
        # made meanwhile (the PostgreSQL broker's history) are still synchronous.
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
        import django

        django.setup()
        from myapp.brokers import get_broker

        broker = get_broker()
        result = {"backend": backend}
        result["history_bytes_per_1000"] = history_cost(stack, broker)
        result["replay_1000_ms"] = replay_time(stack, broker)
        result["latency_ms"] = latency(stack)
        result["idle_1000"] = idle_streams(stack)
        result["job_notification_ms"] = job_notification(stack, broker)
        result["recovery"] = recovery(stack)
        return result
    finally:
        stack.stop()


def report(results, out):
    lines = [
        "# Delivery figures",
        "",
        "From `python -m bench.delivery` (2 gevent workers, embedded servers, this 2-core machine).",
        "",
        "| figure | " + " | ".join(r["backend"] for r in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    jobs = lambda r, key: r["job_notification_ms"][key]  # noqa: E731
    rows = [
        ("history: bytes per 1,000 events (~100 B data each)", lambda r: f"{r['history_bytes_per_1000']:,}"),
        ("replay of 1,000 missed events (ms, median of 5)", lambda r: r["replay_1000_ms"]),
        (
            "publish-to-receive latency p50 / p99 / max (ms)",
            lambda r: "{p50} / {p99} / {max}".format(**r["latency_ms"]),
        ),
        ("worker RSS per idle stream, 1,000 streams (KB)", lambda r: r["idle_1000"]["rss_kb_per_stream"]),
        ("worker RSS for 1,000 idle streams (MB)", lambda r: r["idle_1000"]["rss_mb"]),
        ("job's last step to notification in the page (ms, median of 5)", lambda r: jobs(r, "from_last_step_ms")),
        ("job.finished publish to notification (ms, median of 5)", lambda r: jobs(r, "from_finished_publish_ms")),
        ("broker restart: server ready to send_event OK (s)", lambda r: r["recovery"]["publish_ok_s"]),
        ("broker restart: server ready to new stream OK (s)", lambda r: r["recovery"]["new_stream_ok_s"]),
        ("broker restart: server ready to open stream receiving (s)", lambda r: r["recovery"]["old_stream_received_s"]),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(str(cell(r)) for r in results) + " |")
    (out / "delivery.md").write_text("\n".join(lines) + "\n")
    (out / "delivery.json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["redis", "postgres"], choices=["redis", "postgres"])
    parser.add_argument("--out", type=Path, default=BASE / "docs" / "benchmarks")
    parser.add_argument("--one", choices=["redis", "postgres"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    results = []
    for backend in args.backends:
        completed = subprocess.run(
            [sys.executable, "-m", "bench.delivery", "--one", backend],
            cwd=BASE,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if completed.returncode != 0:
            print(completed.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report(results, args.out)
    print(f"wrote {args.out / 'delivery.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
