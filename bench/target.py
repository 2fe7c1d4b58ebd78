"""Run the scenarios against one target, in a process of its own (Django settings are per process).

    python -m bench.target CONFIG.json RESULT.json

Targets: ``redis`` and ``postgres`` (the service with that broker backend)
and ``baseline`` (``bench.baseline`` on Valkey). CONFIG holds the runner's
options (see ``bench.runner``); RESULT receives {"target", "results": [...],
"server_log", "error"}. Started by ``bench.runner``; not meant to be run by
hand.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import scenarios
from bench.clients import Clients
from bench.servers import Stack

__all__ = ["run"]


def _log(target):
    began = time.monotonic()

    def log(message):
        print(f"[{time.monotonic() - began:7.1f}s {target}] {message}", file=sys.stderr, flush=True)

    return log


def _loadgen_processes(options, sizes):
    if options.loadgen_processes:
        return options.loadgen_processes
    # Each process may hold ~19,900 sockets; 5,000 each keeps them light.
    return max(2, min(4, math.ceil(max(sizes, default=1) / 5000)))


def _wire(target, stack, options):
    """Return (stream_path, publish, send_event) for the target, after django.setup()."""
    from urllib.parse import quote

    from myapp.tokens import subscription_token

    route = "/baseline/events/" if target == "baseline" else "/events/"

    def stream_path(channel):
        token = subscription_token([channel], max_age=24 * 3600)
        return f"{route}?token={quote(token)}&channel={quote(channel)}".encode()

    if target == "baseline":
        import redis

        from bench import baseline

        client = redis.Redis.from_url(stack.env["REDIS_URL"])

        def publish(channel, event_type, data):
            baseline.publish(client, channel, event_type, data)

        def send_event(seq):
            baseline.send_event(client, "bench:send", "bench", {"seq": seq})

        return stream_path, publish, send_event

    from myapp.brokers import get_broker
    from myapp.publish import send_event as myapp_send_event

    broker = get_broker()

    def publish(channel, event_type, data):
        broker.publish(channel, event_type, data)

    def send_event(seq):
        myapp_send_event("bench:send", "bench", {"seq": seq})

    return stream_path, publish, send_event


def run(config):
    """Run the configured scenarios against config["target"]; return the result dict."""
    target = config["target"]
    options = argparse.Namespace(**config["options"])
    log = _log(target)
    sizes = {name: config["sizes"][name] for name in config["scenarios"] if name in config["sizes"]}
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{target}-"))
    os.chmod(directory, 0o755)  # PostgreSQL runs as another user when we are root
    stack = Stack(
        directory,
        backend="postgres" if target == "postgres" else "redis",
        workers=options.workers,
        heartbeat=options.heartbeat,
    )
    clients = None
    results = []
    outcome = {"target": target, "results": results, "error": None}
    try:
        log(f"starting the stack in {directory}")
        stack.start()
        os.environ.update(stack.env)
        import django

        django.setup()
        stream_path, publish, send_event = _wire(target, stack, options)
        processes = _loadgen_processes(options, [n for values in sizes.values() for n in values])
        clients = Clients(stack.host, stack.port, processes)
        ctx = scenarios.Context(
            target=target,
            stack=stack,
            clients=clients,
            stream_path=stream_path,
            publish=publish,
            send_event=send_event,
            options=options,
            log=log,
        )
        _warm_up(ctx)
        for name in config["scenarios"]:
            for size in sizes.get(name, [0]):
                log(f"{name} N={size}")
                began = time.monotonic()
                try:
                    if name == "send-event":
                        result = scenarios.send_event(ctx, options.send_events)
                    elif name == "limit":
                        result = scenarios.limit(ctx, options.limit_max)
                    else:
                        result = scenarios.SCENARIOS[name](ctx, size)
                except Exception as error:  # noqa: BLE001 - one failed scenario must not hide the others
                    log(f"  FAILED: {type(error).__name__}: {error}")
                    traceback.print_exc()
                    crash = f"crashed: {type(error).__name__}: {error}"
                    result = {"scenario": name, "streams": size, "problems": [crash]}
                    try:
                        clients.close()
                    except Exception:  # noqa: BLE001
                        pass
                result.update(target=target, wall_s=round(time.monotonic() - began, 1))
                for problem in result["problems"]:
                    log(f"  PROBLEM: {problem}")
                log("  " + _headline(result))
                results.append(result)
    except Exception as error:  # noqa: BLE001 - reported in the result file
        traceback.print_exc()
        outcome["error"] = f"{type(error).__name__}: {error}"
    finally:
        if clients is not None:
            clients.stop()
        outcome["server_log"] = stack.log_issues()
        stack.stop()
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            log(f"kept {directory}")
    return outcome


def _warm_up(ctx):
    """Start both workers' hubs, import the stream code paths and fill the connection pools."""
    from bench.scenarios import _healthz, _open, _settle

    _healthz(ctx, 20, 0.5)
    _open(ctx, 100, ["bench:warmup"], concurrency=50)
    _settle(ctx)


def _headline(result):
    keys = (
        "streams_live",
        "rss_per_stream_kb",
        "idle_cpu_s_per_s",
        "healthz_ms",
        "latency_ms",
        "fanout_complete_ms",
        "deliveries_per_s",
        "worker_cpu_us_per_delivery",
        "all_live_s",
        "errors",
        "send_event_ms",
        "first_error_at",
        "lost",
        "dups",
    )
    parts = []
    for key in keys:
        if key in result:
            value = result[key]
            if isinstance(value, dict) and "p50" in value:
                value = f"p50 {value['p50']} p99 {value['p99']} max {value['max']}"
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a timeout killing the run) must still stop gunicorn and the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcome = run(json.loads(args.config.read_text()))
    args.result.write_text(json.dumps(outcome, indent=1))
    return 0 if outcome["error"] is None else 2


if __name__ == "__main__":
    sys.exit(main())
