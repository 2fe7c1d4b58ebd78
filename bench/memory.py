"""Where a stream's memory goes: one worker, N idle streams, the difference per stream, broken down.

    .venv/bin/python -m bench.memory [--streams 5000] [--private] [--trace] [--out FILE]

Starts the Redis target (bench.servers.Stack, one gevent worker), reads the
worker's diagnostics (``/bench/memory/``, bench.views) before and after
opening N idle streams on one shared channel (or N private channels with
``--private``), and prints per stream: RSS, live Python objects by type, and
with ``--trace`` (the worker runs under PYTHONTRACEMALLOC) the traced bytes
by source file. RSS minus traced is memory Python's allocator does not see
(greenlet stacks are traced; interpreter frame chunks and allocator slack
are not). Tracing slows the worker: its RSS is larger than without.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.clients import Clients
from bench.servers import Stack


def _diagnostics(stack):
    with urllib.request.urlopen(stack.url + "/bench/memory/", timeout=120) as response:
        return json.loads(response.read())


def _per_stream(before, after, streams, key, top=25):
    names = set(before.get(key, {})) | set(after.get(key, {}))
    diffs = {name: (after.get(key, {}).get(name, 0) - before.get(key, {}).get(name, 0)) / streams for name in names}
    return dict(
        sorted(((n, round(v, 2)) for n, v in diffs.items() if abs(v) >= 0.01), key=lambda kv: -abs(kv[1]))[:top]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--private", action="store_true", help="one channel per stream (default: one shared)")
    parser.add_argument("--trace", action="store_true", help="run the worker under tracemalloc")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    options = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = {"PYTHONTRACEMALLOC": "1"} if options.trace else {}
    stack = Stack(directory, backend="redis", workers=1, env=env)
    clients = None
    try:
        stack.start()
        os.environ.update(stack.env)
        import django

        django.setup()
        from urllib.parse import quote

        from myapp.tokens import subscription_token

        def path(channel):
            token = subscription_token([channel], max_age=3600)
            return f"/events/?token={quote(token)}&channel={quote(channel)}".encode()

        clients = Clients(stack.host, stack.port, max(1, min(4, options.streams // 5000 + 1)))
        # Warm up: the hub, the code paths, the allocator's first arenas.
        clients.open([(0, path("bench:warmup"))] * 200, concurrency=100, timeout=60)
        clients.close(reset=True)
        time.sleep(2)
        before = _diagnostics(stack)
        if options.private:
            streams = [(k, path(f"bench:user:{k}")) for k in range(options.streams)]
        else:
            shared = path("bench:shared")
            streams = [(0, shared)] * options.streams
        opened = clients.open(streams, channels=options.streams if options.private else 1, timeout=300)
        time.sleep(3)
        after = _diagnostics(stack)
        live = opened["live"]
        result = {
            "streams": live,
            "channels": "private" if options.private else "shared",
            "traced": options.trace,
            "rss_kb_per_stream": round((after["rss_bytes"] - before["rss_bytes"]) / live / 1024, 2),
            "gc_objects_per_stream": round((after["gc_objects"] - before["gc_objects"]) / live, 1),
            "greenlets_per_stream": round((after["greenlets"] - before["greenlets"]) / live, 2),
            "objects_per_stream": _per_stream(before, after, live, "by_type"),
        }
        if options.trace:
            traced = (after["traced_bytes"] - before["traced_bytes"]) / live
            result["traced_kb_per_stream"] = round(traced / 1024, 2)
            result["untraced_kb_per_stream"] = round(result["rss_kb_per_stream"] - traced / 1024, 2)
            result["traced_bytes_per_stream_by_file"] = _per_stream(before, after, live, "traced_by_file")
        print(json.dumps(result, indent=2))
        if options.out:
            options.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if clients is not None:
            clients.stop()
        stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
