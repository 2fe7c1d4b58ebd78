"""The load generator: thousands of SSE clients per process, on raw asyncio transports under uvloop.

Each client is an ``asyncio.Protocol`` on a socket we connect ourselves: a
hand-written HTTP/1.1 request, the chunked body and the event stream decoded
by ``bench.sseparse`` in ``data_received``. No HTTP library and no task per
stream once it is open (the same transports as ``asyncio.open_connection``,
minus its StreamReader copy and wake-up per read).

A process may hold at most 20,000 file descriptors here, so
``bench.clients.Clients`` spreads the streams over several of these
processes and sends them commands over a pipe: ``open`` (connect and wait for
``stream.open``), ``collect`` (wait until the expected events arrived, then
report), ``status`` and ``close``. Each process connects from its own
loopback address (127.0.0.2, .3, ...) so the ephemeral ports never run short.

Events: the benchmark publishes events of type ``bench`` whose data is JSON
``{"seq": int, "t": int, ...}``: ``seq`` numbers the scenario's events from
0, event ``seq`` goes to channel index ``seq % channels``, and ``t`` is the
publish time in nanoseconds (``time.time_ns()``, one clock for every process
on the machine). A stream on channel index ``c`` expects exactly the events
``c, c + channels, c + 2 * channels, ...`` below ``events``, once each.
"""

import array
import asyncio
import errno
import json
import os
import resource
import socket
import struct
from collections import Counter
from time import time_ns

from bench.sseparse import ChunkedDecoder, ProtocolError, SSEParser

__all__ = ["LoadGen", "Stream", "run_process"]

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: the server notices at its next write


# -- the child process -----------------------------------------------------------


class Stream(asyncio.Protocol):
    """One SSE client connection. ``error`` is None or why it failed (str)."""

    __slots__ = (
        "gen",
        "channel",
        "request",
        "transport",
        "head",
        "decoder",
        "parser",
        "waiter",
        "started_ns",
        "live_ns",
        "error",
        "closing",
        "ended",
        "seen",
        "received",
        "last_seq",
    )

    def __init__(self, gen, channel, request, waiter):
        self.gen = gen
        self.channel = channel  # channel index (int)
        self.request = request
        self.transport = None
        self.head = b""  # response head while it is incomplete, then None
        self.decoder = None
        self.parser = SSEParser()
        self.waiter = waiter  # resolved when the stream is live or failed
        self.started_ns = 0
        self.live_ns = 0
        self.error = None
        self.closing = False
        self.ended = False
        self.seen = None  # bytearray: 1 per expected event received
        self.received = 0
        self.last_seq = -1

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        now = time_ns()
        if self.head is not None:
            data = self._read_head(data)
            if not data:
                return
        if self.decoder is not None:
            try:
                data = self.decoder.feed(data)
            except ProtocolError as error:
                self.fail(f"bad chunked body: {error}")
                return
            if not data:
                return
        for event_type, payload, _ in self.parser.feed(data):
            if event_type == "bench":
                self.gen.on_event(self, payload, now)
            elif event_type == "stream.open":
                self.live_ns = now
                if not self.waiter.done():
                    self.waiter.set_result(True)
            elif event_type == "stream.reset":
                self.fail("stream.reset")

    def _read_head(self, data):
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > 65536:
                self.fail("response head over 64 KB")
            else:
                self.head = head
            return b""
        self.head = None
        lines = head[:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.fail("bad status line")
            return b""
        if status != 200:
            self.fail(f"HTTP {status}")
            return b""
        content_type = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.decoder = ChunkedDecoder()
            elif name == b"content-type":
                content_type = value.strip().lower()
        if not content_type.startswith(b"text/event-stream"):
            self.fail(f"content-type {content_type.decode(errors='replace')!r}")
            return b""
        return head[end + 4 :]

    def fail(self, reason):
        if self.error is None:
            self.error = reason
        if not self.waiter.done():
            self.waiter.set_result(False)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self, reset=True):
        self.closing = True
        transport = self.transport
        if transport is not None and not self.ended:
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
            transport.abort()

    def connection_lost(self, exc):
        self.ended = True
        if not self.closing and self.error is None:
            self.error = f"reset ({type(exc).__name__})" if exc is not None else "closed by server"
            self.gen.lost_streams += 1
        if not self.waiter.done():
            self.waiter.set_result(False)


class LoadGen:
    """The state of one load generator process (see the module docstring)."""

    def __init__(self, host, port, source_ip):
        self.address = (host, port)
        self.source_ip = source_ip
        self.host_header = f"{host}:{port}".encode()
        self.streams = []
        self._arm(0, 1)
        self.lost_streams = 0

    def _arm(self, events, channels):
        self.events = events
        self.channels = channels
        self.latencies = array.array("q")  # ns, publish to receive, one per delivery since the last collect
        self.last_ns = array.array("q", bytes(8 * events))  # per seq: the latest receive time (ns)
        self.collected = 0  # events below this seq were reported by an earlier collect
        self.target = 0  # collect waits until ``unique`` reaches this
        self.unique = 0
        self.dups = 0
        self.misrouted = 0
        self.malformed = 0
        self.reordered = 0
        self.complete = asyncio.Event()

    def on_event(self, stream, payload, now):
        try:
            message = json.loads(payload)
            seq = message["seq"]
            sent = message["t"]
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        channels = self.channels
        if not 0 <= seq < self.events or seq % channels != stream.channel or stream.seen is None:
            self.misrouted += 1
            return
        self.latencies.append(now - sent)
        if now > self.last_ns[seq]:
            self.last_ns[seq] = now
        index = seq // channels
        seen = stream.seen
        if seen[index]:
            self.dups += 1
            return
        seen[index] = 1
        stream.received += 1
        if seq < stream.last_seq:
            self.reordered += 1
        else:
            stream.last_seq = seq
        self.unique += 1
        if self.unique >= self.target:
            self.complete.set()

    # -- commands ---------------------------------------------------------------

    async def open(self, streams, events, channels, concurrency, timeout, start_ns=None):
        """Open ``streams`` (list of (channel index, path bytes)); wait until each is live or failed."""
        loop = asyncio.get_running_loop()
        self._arm(events, channels)
        semaphore = asyncio.Semaphore(concurrency) if concurrency else None
        batch = []
        for channel, path in streams:
            request = b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n" % (path, self.host_header)
            stream = Stream(self, channel, request, loop.create_future())
            stream.seen = bytearray(len(range(channel, events, channels)))
            batch.append(stream)
        self.streams.extend(batch)
        if start_ns is not None:
            await asyncio.sleep(max(0.0, (start_ns - time_ns()) / 1e9))
        started = time_ns()

        async def one(stream):
            if semaphore is None:
                await self._connect(stream, timeout)
            else:
                async with semaphore:
                    await self._connect(stream, timeout)

        await asyncio.gather(*(one(stream) for stream in batch))
        errors = Counter(stream.error for stream in batch if stream.error is not None)
        live = [stream for stream in batch if stream.live_ns and stream.error is None]
        to_live = array.array("d", ((stream.live_ns - stream.started_ns) / 1e6 for stream in live))
        return {
            "attempted": len(batch),
            "live": len(live),
            "errors": dict(errors),
            "started_ns": started,
            "last_live_ns": max((stream.live_ns for stream in live), default=0),
            "to_live_ms": to_live.tobytes(),
        }

    async def _connect(self, stream, timeout):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        stream.started_ns = time_ns()
        try:
            async with asyncio.timeout(timeout):
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source_ip, 0))
                await loop.sock_connect(sock, self.address)
                await loop.create_connection(lambda: stream, sock=sock)
                await stream.waiter
        except TimeoutError:
            stream.fail("timeout" if stream.transport is not None else "connect: timeout")
        except OSError as error:
            stream.fail(f"connect: {errno.errorcode.get(error.errno, type(error).__name__)}")
        if stream.transport is None:
            sock.close()  # never handed to a transport

    async def collect(self, end, timeout):
        """Wait up to ``timeout`` seconds until every live stream has its events below seq ``end``; report.

        Figures cover the events from the previous collect's ``end`` to this
        one (a phase); counts of duplicates and the like are cumulative.
        """
        channels = self.channels
        live = [stream for stream in self.streams if stream.live_ns and stream.seen is not None]
        wanted = [(stream, len(range(stream.channel, end, channels))) for stream in live]
        self.target = sum(count for _, count in wanted)
        self.complete.clear()
        if self.unique < self.target:
            try:
                async with asyncio.timeout(timeout):
                    await self.complete.wait()
            except TimeoutError:
                pass
        await asyncio.sleep(0.2)  # let duplicates that trail the last event show up
        lost = 0
        streams_with_loss = 0
        for stream, count in wanted:
            missing = stream.seen.count(0, 0, count)
            if missing:
                lost += missing
                streams_with_loss += 1
        latencies, self.latencies = self.latencies, array.array("q")
        start, self.collected = self.collected, end
        return {
            "expected": self.target,
            "unique": self.unique,
            "lost": lost,
            "streams_with_loss": streams_with_loss,
            "dups": self.dups,
            "misrouted": self.misrouted,
            "malformed": self.malformed,
            "reordered": self.reordered,
            "latencies_ns": latencies.tobytes(),
            "last_ns": self.last_ns[start:end].tobytes(),
            **self._status(),
        }

    async def status(self):
        return self._status()

    def _status(self):
        live = [stream for stream in self.streams if stream.live_ns]
        return {
            "open": sum(1 for stream in live if not stream.ended),
            "ended": sum(1 for stream in live if stream.ended),
            "dropped_by_server": self.lost_streams,
            "comments": sum(stream.parser.comments for stream in live),
            "errors": dict(Counter(stream.error for stream in self.streams if stream.error is not None)),
        }

    async def close(self, reset=True):
        """Close every stream (with RST when ``reset``) and forget them."""
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.close(reset)
        await asyncio.sleep(0.05)
        self.lost_streams = 0
        self._arm(0, 1)
        return {"closed": len(streams)}


async def _serve(conn, host, port, source_ip):
    loop = asyncio.get_running_loop()
    gen = LoadGen(host, port, source_ip)
    commands = asyncio.Queue()

    def readable():
        # The loop made the pipe non-blocking; a message (or reply) of
        # megabytes must be read and written whole.
        os.set_blocking(conn.fileno(), True)
        try:
            commands.put_nowait(conn.recv())
        except EOFError:
            loop.remove_reader(conn.fileno())
            commands.put_nowait({"op": "exit"})

    loop.add_reader(conn.fileno(), readable)
    while True:
        command = await commands.get()
        op = command.pop("op")
        if op == "exit":
            await gen.close()
            return
        try:
            reply = await getattr(gen, op)(**command)
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"exception": f"{type(error).__name__}: {error}"}
        os.set_blocking(conn.fileno(), True)
        conn.send(reply)


def run_process(conn, host, port, source_ip):
    """The entry point of a load generator process: serve commands from ``conn`` until told to exit."""
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(_serve(conn, host, port, source_ip))
