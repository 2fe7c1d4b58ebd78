"""The benchmark's handle on its load generator processes (``bench.loadgen``).

``Clients`` starts them (``multiprocessing``, spawn: they import no Django),
spreads streams over them round-robin, sends each command to all of them over
their pipes, and merges the replies (counts added, latencies concatenated,
per-event receive times combined with max).
"""

import array
import multiprocessing
import time
from collections import Counter

import psutil

from bench.loadgen import run_process

__all__ = ["Clients", "LoadGenError"]


class LoadGenError(RuntimeError):
    """A load generator process died or did not answer in time."""


class Clients:
    """Load generator processes, driven from the benchmark process.

    host, port: the server (TCP).
    processes: how many load generator processes (each holds at most
        ~19,900 streams: the per-process file limit).
    """

    def __init__(self, host, port, processes):
        context = multiprocessing.get_context("spawn")
        self._children = []
        for index in range(processes):
            parent, child = context.Pipe()
            process = context.Process(
                target=run_process,
                args=(child, host, port, f"127.0.0.{2 + index}"),
                name=f"loadgen-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            self._children.append((process, parent))

    def cpu_seconds(self):
        """CPU seconds (user + system) used so far by the load generator processes (float)."""
        total = 0.0
        for process, _ in self._children:
            try:
                times = psutil.Process(process.pid).cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def _call(self, commands, timeout):
        for (_, conn), command in zip(self._children, commands, strict=True):
            conn.send(command)
        replies = []
        deadline = time.monotonic() + timeout
        for process, conn in self._children:
            while not conn.poll(0.5):
                if not process.is_alive():
                    raise LoadGenError(f"{process.name} died (exit code {process.exitcode})")
                if time.monotonic() > deadline:
                    raise LoadGenError(f"{process.name} did not answer within {timeout:.0f} s")
            reply = conn.recv()
            if "exception" in reply:
                raise LoadGenError(f"{process.name}: {reply['exception']}")
            replies.append(reply)
        return replies

    def open(self, streams, *, events=0, channels=1, concurrency=200, timeout=60.0, start_ns=None):
        """Open streams and wait until each is live (its ``stream.open`` arrived) or failed.

        streams: list of (channel index, path bytes), spread round-robin over
            the processes.
        events, channels: what the streams will receive (module docstring).
        concurrency: connections being opened at once per process, or None for
            all at once (connect storm).
        timeout: seconds each stream may take to become live.
        start_ns: ``time.time_ns()`` at which every process starts connecting.

        Return a dict: attempted, live, errors ({reason: count}), started_ns
        and last_live_ns (ns, earliest start and latest live over all
        processes), to_live_ms (per-stream seconds from connect to live, a
        list of ms).
        """
        count = len(self._children)
        commands = [
            {
                "op": "open",
                "streams": streams[index::count],
                "events": events,
                "channels": channels,
                "concurrency": concurrency,
                "timeout": timeout,
                "start_ns": start_ns,
            }
            for index in range(count)
        ]
        replies = self._call(commands, timeout + 60 + len(streams) / 100)
        to_live = []
        for reply in replies:
            to_live.extend(array.array("d", reply["to_live_ms"]))
        return {
            "attempted": sum(reply["attempted"] for reply in replies),
            "live": sum(reply["live"] for reply in replies),
            "errors": _merge_counts(reply["errors"] for reply in replies),
            "started_ns": min(reply["started_ns"] for reply in replies),
            "last_live_ns": max(reply["last_live_ns"] for reply in replies),
            "to_live_ms": to_live,
        }

    def collect(self, end, timeout):
        """Wait up to ``timeout`` seconds until the streams have every event below seq ``end``; merge.

        Return a dict of counts (expected and unique: cumulative deliveries
        wanted and received; lost and streams_with_loss: below ``end``; dups,
        misrouted, malformed, reordered: cumulative; open, ended, errors),
        ``latencies_ns`` (array('q'), one per delivery since the previous
        collect) and ``last_ns`` (list: per seq from the previous collect's
        ``end`` to this one, the latest receive time in ns; 0 if none).
        """
        command = {"op": "collect", "end": end, "timeout": timeout}
        replies = self._call([dict(command) for _ in self._children], timeout + 120)
        merged = _merge_status(replies)
        for key in ("expected", "unique", "lost", "streams_with_loss", "dups", "misrouted", "malformed", "reordered"):
            merged[key] = sum(reply[key] for reply in replies)
        latencies = array.array("q")
        last_ns = None
        for reply in replies:
            latencies.frombytes(reply["latencies_ns"])
            per_seq = array.array("q", reply["last_ns"])
            last_ns = per_seq if last_ns is None else array.array("q", map(max, last_ns, per_seq))
        merged["latencies_ns"] = latencies
        merged["last_ns"] = list(last_ns or [])
        return merged

    def status(self):
        """Return the merged stream counts: open, ended, dropped_by_server, comments, errors."""
        return _merge_status(self._call([{"op": "status"}] * len(self._children), 60))

    def close(self, reset=True):
        """Close every stream (RST by default, so the server notices at its next write)."""
        replies = self._call([{"op": "close", "reset": reset}] * len(self._children), 60)
        return sum(reply["closed"] for reply in replies)

    def stop(self):
        """End the load generator processes."""
        for _process, conn in self._children:
            try:
                conn.send({"op": "exit"})
            except OSError:
                pass
        for process, conn in self._children:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._children = []


def _merge_counts(dicts):
    total = Counter()
    for counts in dicts:
        total.update(counts)
    return dict(total)


def _merge_status(replies):
    return {
        "open": sum(reply["open"] for reply in replies),
        "ended": sum(reply["ended"] for reply in replies),
        "dropped_by_server": sum(reply["dropped_by_server"] for reply in replies),
        "comments": sum(reply["comments"] for reply in replies),
        "errors": _merge_counts(reply["errors"] for reply in replies),
    }
