"""A hub's subscriber connections to a Redis Cluster: one per primary, never one per channel.

Each connection carries the shard subscriptions (SSUBSCRIBE) of the
partitions whose slot its node serves; one SSUBSCRIBE names channels of one
partition only, so of one slot (several slots in one call are CROSSSLOT).
Replies are read with one ``recv`` per readable connection and split by
hiredis, as ``myapp.brokers.redis.RedisListener`` does.

A subscription the server ends (``sunsubscribe`` that this listener did not
ask for: the slot moved, by migration or failover) and any error reply
(``-MOVED`` for a stale slot map) fail the listener with BrokerUnavailable:
the hub then opens a new one, which reads the slot map again, and replays
from the history what the old one missed (``myapp.link``).

Markers (``publish_marker``) go out in every partition; the marker the hub
waits for (on its own channel) is the one that completes a round, so it
proves every connection alive; the others carry their partition's position
forward under another name, which no stream holds.
"""

from collections import Counter, defaultdict

import hiredis
import redis

from myapp.events import Event
from myapp.exceptions import BrokerUnavailable
from myapp.ids import parse

from .._wakeup import Waker
from ..base import Listener, Subscribed
from ..redis import unavailable
from . import ERRORS

__all__ = ["ClusterListener"]

#: Channels per SSUBSCRIBE/SUNSUBSCRIBE command.
_BATCH = 1000


class _Node:
    """One connection to one primary."""

    __slots__ = ("address", "connection", "sock", "reader")

    def __init__(self, address, options):
        self.address = address
        host, _, port = address.rpartition(":")
        self.connection = redis.Connection(host=host, port=int(port), **options)
        self.connection.connect()
        self.sock = self.connection._sock  # redis-py has no public accessor
        self.reader = hiredis.Reader()


class ClusterListener(Listener):
    def __init__(self, broker, hub_channel):
        self._broker = broker
        self._hub_channel = hub_channel
        self._prefix = broker.prefix.encode()
        self._parts = {f"{{{tag}}}".encode(): part for part, tag in enumerate(broker.tags)}
        self._waker = Waker()
        self._nodes = {}  # fileno -> _Node
        self._leaving = Counter()  # shard channel (bytes) -> SUNSUBSCRIBE replies this listener asked for
        self._round = set()  # partitions whose marker of the current round has not come back
        try:
            self._owners = broker.owners()
            options = broker.connection_options()
            by_address = {}
            for address in dict.fromkeys(self._owners):
                node = _Node(address, options)
                by_address[address] = node
                self._nodes[node.sock.fileno()] = node
            self._node_of = [by_address[address] for address in self._owners]
            for part in range(broker.partitions):
                self._send(part, "SSUBSCRIBE", [hub_channel])
        except BrokerUnavailable:
            self.close()
            raise
        except ERRORS as error:
            self.close()
            raise unavailable(error) from error

    def _send(self, part, verb, channels):
        base = self._broker.bases[part]
        names = [base + "c:" + channel for channel in channels]
        if verb == "SUNSUBSCRIBE":
            self._leaving.update(name.encode() for name in names)
        connection = self._node_of[part].connection
        try:
            for start in range(0, len(names), _BATCH):
                connection.send_command(verb, *names[start : start + _BATCH], check_health=False)
        except ERRORS as error:
            raise unavailable(error) from error

    def _each_partition(self, verb, channels):
        groups = defaultdict(list)
        partition = self._broker.partition
        for channel in channels:
            groups[partition(channel)].append(channel)
        for part, names in groups.items():
            self._send(part, verb, names)

    def subscribe(self, channels):
        self._each_partition("SSUBSCRIBE", channels)

    def unsubscribe(self, channels):
        self._each_partition("SUNSUBSCRIBE", channels)

    def _decode(self, name):
        """The partition and channel of a shard channel name (bytes)."""
        close = name.index(b"}", len(self._prefix))
        return self._parts[name[len(self._prefix) : close + 1]], name[close + 3 :].decode()

    def _items(self, node, items):
        gets = node.reader.gets
        try:
            while (reply := gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise BrokerUnavailable(
                        f"Redis Cluster: {node.address} answered {reply}; reading the slot map again"
                    )
                kind = reply[0]
                if kind == b"smessage":
                    part, channel = self._decode(reply[1])
                    raw_id, event_type, data = reply[2].decode().split("\n", 2)
                    if channel == self._hub_channel:
                        self._round.discard(part)
                        if self._round:
                            channel += f"/{part}"  # not the last of its round: it only moves the position
                    items.append(Event(channel, parse(raw_id), event_type, data, 0, part))
                elif kind == b"ssubscribe":
                    items.append(Subscribed(self._decode(reply[1])[1]))
                elif kind == b"sunsubscribe":
                    name = reply[1]
                    if not self._leaving[name]:
                        part, channel = self._decode(name)
                        raise BrokerUnavailable(
                            f"Redis Cluster: {node.address} ended the subscription of {channel!r} (partition "
                            f"{part}): its slot moved; reading the slot map again"
                        )
                    self._leaving[name] -= 1
                    if not self._leaving[name]:
                        del self._leaving[name]
        except (hiredis.ProtocolError, ValueError, TypeError, IndexError, KeyError) as error:
            raise BrokerUnavailable(f"Redis Cluster: unexpected reply from {node.address}: {error}") from error

    def _drain(self):
        items = []
        for node in self._nodes.values():
            self._items(node, items)
        return items

    def wait(self, timeout):
        items = self._drain()
        if items:
            return items
        try:
            readable = self._waker.wait_any(list(self._nodes), timeout)
            for fileno in readable:
                node = self._nodes[fileno]
                data = node.sock.recv(1 << 16)
                if not data:
                    raise BrokerUnavailable(f"Redis Cluster: {node.address} closed the subscriber connection")
                node.reader.feed(data)
        except (BlockingIOError, TimeoutError):
            pass
        except (OSError, ValueError) as error:
            raise unavailable(error) from error
        return self._drain()

    def wakeup(self):
        self._waker.wakeup()

    def publish_marker(self):
        self._round = set(range(self._broker.partitions))
        for part in range(self._broker.partitions):
            self._broker.publish_marker(self._hub_channel, part)

    def close(self):
        for node in self._nodes.values():
            try:
                node.connection.disconnect()
            except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                pass
        self._nodes = {}
        self._waker.close()
