"""What a burst of stream requests from one session does to the worker: ``python -m bench.burst``.

    .venv/bin/python -m bench.burst [--requests 200] [--rounds 5] [--out FILE]

One gevent worker (Redis backend, SQLite, the demo's settings, 15 s
heartbeats, MYAPP_MAX_STREAMS_PER_USER 10), one logged-in user. Each round
sends ``--requests`` stream requests at once on raw sockets with the user's
session cookie (a page reloaded in a loop, or a script gone wrong) and, while
they are answered, times one ``GET /healthz`` on another connection: how long
the worker leaves everyone else waiting. The same ``/healthz`` with no burst
is the reference. Prints (and with ``--out`` writes) JSON: the statuses seen
and ``healthz_ms`` per round.
"""

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from scripts.servers import EmbeddedValkey
from tests.stack import LiveStack


def _healthz_ms(url):
    began = time.perf_counter()
    requests.get(url + "/healthz", timeout=30).raise_for_status()
    return (time.perf_counter() - began) * 1000


def _burst(stack, cookie, count):
    request = f"GET /events/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", stack.port), timeout=30) for _ in range(count)]
    result = {}

    def probe():
        time.sleep(0.005)  # the burst is on its way
        result["healthz_ms"] = _healthz_ms(stack.url)

    prober = threading.Thread(target=probe)
    for sock in socks:
        sock.sendall(request)
    prober.start()
    statuses = Counter(int(sock.recv(64).split(b" ", 2)[1]) for sock in socks)
    prober.join()
    for sock in socks:
        sock.close()
    return {"statuses": dict(statuses), **result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as scratch:
        valkey = EmbeddedValkey(Path(scratch) / "valkey")
        valkey.start()
        try:
            stack = LiveStack(
                Path(scratch) / "stack",
                mode="redis",
                redis_url=valkey.url,
                workers=1,
                heartbeat=15.0,
                task_worker=False,
                env={"MYAPP_MAX_STREAMS_PER_USER": "10"},
            )
            with stack:
                session = stack.login("alice")
                cookie = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
                quiet = [_healthz_ms(stack.url) for _ in range(20)]
                rounds = []
                for _ in range(options.rounds):
                    rounds.append(_burst(stack, cookie, options.requests))
                    deadline = time.monotonic() + 10
                    while requests.get(stack.url + "/healthz", timeout=10).json()["streams"] and (
                        time.monotonic() < deadline
                    ):
                        time.sleep(0.05)
        finally:
            valkey.stop()
    result = {
        "requests_per_burst": options.requests,
        "healthz_quiet_ms": {"p50": round(statistics.median(quiet), 2), "max": round(max(quiet), 2)},
        "rounds": rounds,
        "healthz_during_burst_ms": sorted(round(r["healthz_ms"], 1) for r in rounds),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if options.out:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
