"""What one publish costs the Redis server, and how many one server takes: ``python -m bench.publish``.

    .venv/bin/python -m bench.publish [--events 20000] [--processes 1 2 4] [--seconds 5] [--out FILE]
    .venv/bin/python -m bench.publish --cluster [--processes 1 2 4] [--seconds 5] [--out FILE]

Starts an embedded Valkey (unix socket, no persistence) and, with no streams
open, measures ``myapp.brokers.redis.RedisBroker.publish`` (the Lua script
``send_event`` runs, history and idempotency included):

- ``latency_ms``: one process publishing ``--events`` events one after the
  other (p50/p99), and the same through ``myapp.publish.send_event``
  (validation, JSON encoding, the transaction check);
- ``server_cpu_us_per_event``: the Valkey process's CPU (user + system)
  during that run, divided by the events;
- ``commands``: ``INFO commandstats`` for the run, per command (calls per
  event, microseconds per call): the script itself and every command it ran;
- ``throughput``: events per second from N publishing processes at once,
  each publishing as fast as it can for ``--seconds``, with the server's CPU
  per event at that load.

Half the events carry a publisher id (``id=``, idempotent publishing), on
100 channels, 200-byte JSON data.

``--cluster`` measures throughput only, per publisher count, on one Valkey
(loopback TCP, like the cluster) and on a 3-primary Valkey Cluster
(``myapp.brokers.redis_cluster.RedisClusterBroker``, 16 partitions), with
the servers' CPU per event summed over the nodes. On a machine with fewer
cores than nodes plus publishers the cluster cannot show its scaling; the
report says how many cores there were.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from scripts.servers import EmbeddedValkey, ValkeyCluster, free_port

CHANNELS = 100
DATA = json.dumps({"job": 1, "percent": 50, "pad": "x" * 160})


def _broker(url):
    from myapp.brokers.redis import RedisBroker

    return RedisBroker(url=url)


def _cluster_broker(nodes):
    from myapp.brokers.redis_cluster import RedisClusterBroker

    return RedisClusterBroker(startup_nodes=nodes)


def _commandstats(client):
    stats = {}
    for name, value in client.info("commandstats").items():
        stats[name.removeprefix("cmdstat_")] = {"calls": value["calls"], "usec": value["usec"]}
    return stats


def _diff(before, after, events):
    out = {}
    for name, now in after.items():
        was = before.get(name, {"calls": 0, "usec": 0})
        calls = now["calls"] - was["calls"]
        if calls:
            usec = now["usec"] - was["usec"]
            out[name] = {"calls_per_event": round(calls / events, 3), "usec_per_call": round(usec / calls, 2)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["calls_per_event"] * kv[1]["usec_per_call"]))


def _cpu(process):
    times = process.cpu_times()
    return times.user + times.system


def _percentiles(values):
    values = sorted(values)
    return {
        "p50": round(statistics.median(values), 4),
        "p99": round(values[int(len(values) * 0.99)], 4),
        "mean": round(statistics.fmean(values), 4),
    }


def _sequential(url, events, server, client):
    broker = _broker(url)
    for n in range(200):  # warm-up: connections, script cache
        broker.publish(f"bench:warm:{n % CHANNELS}", "note", DATA)
    stats_before, cpu_before = _commandstats(client), _cpu(server)
    latencies = []
    for n in range(events):
        key = f"k{n}" if n % 2 else None
        began = time.perf_counter()
        broker.publish(f"bench:{n % CHANNELS}", "note", DATA, idempotency_key=key)
        latencies.append((time.perf_counter() - began) * 1000)
    cpu = _cpu(server) - cpu_before
    commands = _diff(stats_before, _commandstats(client), events)
    broker.close()
    return {
        "latency_ms": _percentiles(latencies),
        "server_cpu_us_per_event": round(cpu / events * 1e6, 2),
        "commands": commands,
    }


def _send_event_latency(url, events):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["MYAPP_BROKER_BACKEND"] = "redis"
    os.environ["REDIS_URL"] = url
    import django

    django.setup()
    from myapp.publish import send_event

    for n in range(200):
        send_event(f"bench:warm:{n % CHANNELS}", "note", {"n": n})
    latencies = []
    payload = json.loads(DATA)
    for n in range(events):
        began = time.perf_counter()
        send_event(f"bench:{n % CHANNELS}", "note", payload, id=f"s{n}" if n % 2 else None)
        latencies.append((time.perf_counter() - began) * 1000)
    return _percentiles(latencies)


def _publisher(target, seconds, start, counts, index):
    broker = _cluster_broker(target) if isinstance(target, list) else _broker(target)
    broker.publish("bench:warm", "note", DATA)
    while time.time() < start:
        time.sleep(0.001)
    deadline = start + seconds
    sent = 0
    while time.time() < deadline:
        for _ in range(50):
            broker.publish(f"bench:{index}:{sent % CHANNELS}", "note", DATA, idempotency_key=None)
            sent += 1
    counts[index] = sent
    broker.close()


def _throughput(url, processes, seconds, servers):
    """Events per second from ``processes`` publishers on ``url`` (or a cluster's startup nodes, a list).

    servers: the psutil Process of each server, whose CPU the run costs.
    """
    context = multiprocessing.get_context("fork")
    counts = context.Array("l", processes)
    start = time.time() + 1.0
    children = [
        context.Process(target=_publisher, args=(url, seconds, start, counts, index)) for index in range(processes)
    ]
    for child in children:
        child.start()
    while time.time() < start:
        time.sleep(0.01)
    cpu_before = sum(_cpu(server) for server in servers)
    for child in children:
        child.join()
    cpu = sum(_cpu(server) for server in servers) - cpu_before
    total = sum(counts)
    return {
        "processes": processes,
        "events": total,
        "events_per_s": round(total / seconds),
        "server_cpu_us_per_event": round(cpu / total * 1e6, 2) if total else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cluster", action="store_true", help="throughput: one Valkey vs a 3-node cluster")
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    if options.cluster:
        result = _single_vs_cluster(directory, options.processes, options.seconds)
        print(json.dumps(result, indent=2))
        if options.out:
            options.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    valkey = EmbeddedValkey(directory / "valkey").start()
    try:
        import redis

        client = redis.Redis.from_url(valkey.url)
        server = psutil.Process(valkey.process.pid)
        result = {"events": options.events, **_sequential(valkey.url, options.events, server, client)}
        result["send_event_latency_ms"] = _send_event_latency(valkey.url, options.events // 4)
        result["throughput"] = [_throughput(valkey.url, n, options.seconds, [server]) for n in options.processes]
        print(json.dumps(result, indent=2))
        if options.out:
            options.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        valkey.stop()


def _single_vs_cluster(directory, processes, seconds):
    """Throughput per publisher count on one Valkey (TCP) and on a 3-primary cluster."""
    result = {"cores": os.cpu_count(), "seconds": seconds, "redis": [], "cluster": []}
    valkey = EmbeddedValkey(directory / "single", port=free_port()).start()
    try:
        url = f"redis://127.0.0.1:{valkey.port}"
        result["redis"] = [_throughput(url, n, seconds, [psutil.Process(valkey.process.pid)]) for n in processes]
    finally:
        valkey.stop()
    cluster = ValkeyCluster(directory / "cluster").start()
    try:
        servers = [psutil.Process(node.process.pid) for node in cluster.primaries]
        result["cluster"] = [_throughput(cluster.startup_nodes, n, seconds, servers) for n in processes]
    finally:
        cluster.stop()
    return result


if __name__ == "__main__":
    sys.exit(main())
