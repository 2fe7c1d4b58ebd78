"""How fast a closed client frees its stream: ``python -m bench.hangups``.

    .venv/bin/python -m bench.hangups [--streams 200] [--singles 50] [--out FILE]

One gevent worker, Redis backend, 15 s heartbeats (so a failing heartbeat write
cannot be what frees a stream). Opens streams on raw sockets, then:

- ``single_ms``: closes one client at a time (a FIN, as a browser leaving the
  page) and polls ``/healthz`` until the worker counts one stream less: the
  time from ``close()`` to the hub having freed the stream (p50/max, a
  ``/healthz`` round trip of resolution, about 1-3 ms);
- ``all_at_once_ms``: closes ``--streams`` clients at once and waits until the
  worker holds none of their sockets (counted from its file descriptors);
- ``rss_kb_per_stream`` and ``idle_cpu_s_per_s`` with the streams open: the
  whole stream's cost, hang-up watching included (its share: an epoll
  registration, kernel memory, and two dict entries, ~200 bytes).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.servers import Stack


def _streams(stack):
    with urllib.request.urlopen(stack.url + "/healthz", timeout=5) as response:
        return json.loads(response.read())["streams"]


def _open(stack, path):
    sock = socket.create_connection((stack.host, stack.port), timeout=10)
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"stream.open" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"the stream did not open: {data[:200]!r}")
        data += chunk
    return sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--singles", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-hangups-"))
    stack = Stack(directory, backend="redis", workers=1, heartbeat=15.0)
    try:
        stack.start()
        os.environ.update(stack.env)
        import django

        django.setup()
        from urllib.parse import quote

        from myapp.tokens import subscription_token

        path = f"/events/?token={quote(subscription_token(['bench:hangups'], max_age=3600))}".encode()
        single = []
        for _ in range(options.singles):
            before = _streams(stack)
            sock = _open(stack, path)
            deadline = time.monotonic() + 5
            while _streams(stack) != before + 1 and time.monotonic() < deadline:
                pass
            sock.close()
            closed_at = time.perf_counter()
            while _streams(stack) != before:
                if time.perf_counter() - closed_at > 20:
                    raise RuntimeError("a closed stream was not freed within 20 s")
            single.append((time.perf_counter() - closed_at) * 1000)
        rss_before = stack.worker_rss_bytes()
        socks = [_open(stack, path) for _ in range(options.streams)]
        time.sleep(1)
        rss_after = stack.worker_rss_bytes()
        cpu_before, began = stack.worker_cpu_seconds(), time.monotonic()
        time.sleep(options.idle_seconds)
        idle_cpu = (stack.worker_cpu_seconds() - cpu_before) / (time.monotonic() - began)
        for sock in socks:
            sock.close()
        closed_at = time.perf_counter()
        while sum(stack.worker_clients()) > 0:
            if time.perf_counter() - closed_at > 30:
                break
            time.sleep(0.001)
        all_at_once = (time.perf_counter() - closed_at) * 1000
        result = {
            "single_ms": {
                "p50": round(statistics.median(single), 2),
                "max": round(max(single), 2),
                "count": len(single),
            },
            "all_at_once_ms": round(all_at_once, 1),
            "streams": options.streams,
            "rss_kb_per_stream": round((rss_after - rss_before) / options.streams / 1024, 2),
            "idle_cpu_s_per_s": round(idle_cpu, 5),
        }
        print(json.dumps(result, indent=2))
        if options.out:
            options.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
