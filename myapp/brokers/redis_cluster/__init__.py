"""The Redis Cluster broker: sharded pub/sub over a fixed set of partitions.

Channels hash into ``partitions`` partitions (``partitions.partition_of``);
each partition has a hash tag (``partitions.tags``), so everything one event
touches lives in one slot and one Lua script publishes it, as on one Redis
(``myapp.brokers.redis``). Keys, under ``key_prefix`` and the tag ``{T}`` of
the channel's partition:

- ``{T}ids``, ``{T}epoch``: the partition's position stream and epoch, as
  ``ids``/``epoch`` of the Redis broker, one order per partition;
- ``{T}primary``: the node id of the primary that last took the partition's
  slot (see Failover below);
- ``{T}h:<channel>``, ``{T}l:<channel>``, ``{T}k:<channel> <key>``: history,
  last position and publisher ids, as with one Redis;
- shard channel ``{T}c:<channel>`` (SPUBLISH/SSUBSCRIBE, Redis 7+/Valkey);
- presence under ``{presence}``, one slot (one node) for every hub.

Positions compare only within a partition (``myapp.ids``): a stream whose
channels fall in one partition keeps the plain ``"<ms>-<seq>"`` id, one that
spans partitions carries one position per partition it reads.

Listeners hold one connection per primary (``listener.ClusterListener``).
A slot that moves (migration, failover) ends its shard subscriptions: the
server sends ``sunsubscribe``, or a command gets ``-MOVED``; the listener then
fails, and the hub reconnects as after any outage: it reads the slot map
again, re-subscribes on the new owners and replays from the history what it
missed, so nothing is lost or repeated.

Failover: replication is asynchronous, so a promoted replica may lack events
its primary accepted. Every new connection to a node that was promoted at
some time (``INFO replication``: ``second_repl_offset`` is not -1) compares,
for each partition whose slot it serves, ``{T}primary`` with its own node id;
the first to find another id starts a new epoch in that partition (the Redis
broker's Sentinel rule, per partition): streams of that partition reset
(``trimmed``) instead of skipping what was lost. Keys that arrive by slot
migration on a node that was never promoted keep their epoch: MIGRATE loses
nothing.

Sources: Redis Cluster specification (hash slots, hash tags, MOVED/ASK),
Redis docs for SSUBSCRIBE/SPUBLISH, CLUSTER SETSLOT and MIGRATE; redis-py 8
``redis.cluster.RedisCluster`` (follows MOVED, ASK and TRYAGAIN for commands).
"""

import logging
import threading

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from myapp.exceptions import BrokerConfigurationError
from myapp.ids import format_id, parse

from ..base import Broker, History
from ..options import positive_int, seconds, text
from ..redis import _POSITION, _PRIMARY, _PUBLISH, RedisBroker, addresses, channel_events, unavailable
from .partitions import partition_of, tags

__all__ = ["RedisClusterBroker", "MAX_PARTITIONS"]

log = logging.getLogger("myapp.brokers.redis_cluster")

#: Most partitions a broker takes (their hash tags are searched at start-up).
MAX_PARTITIONS = 256

_SHARDED_PUBLISH = _PUBLISH.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
assert _SHARDED_PUBLISH != _PUBLISH

#: What a cluster call may raise when the cluster cannot answer (RedisClusterException is no RedisError).
ERRORS = (redis.RedisError, RedisClusterException, OSError)


def _node_options(url):
    """Connection options from ``url`` (credentials, TLS) and its node as a ``[host, port]``."""
    try:
        options = parse_url(url)
    except (ValueError, TypeError, AttributeError) as error:
        raise BrokerConfigurationError(
            f"MYAPP_BROKER OPTIONS url is not a redis-py URL ({error}); use e.g. 'redis://10.0.0.1:7000'"
        ) from None
    connection_class = options.pop("connection_class", None)
    if connection_class is UnixDomainSocketConnection:
        raise BrokerConfigurationError(
            "MYAPP_BROKER OPTIONS url is a unix socket; a cluster's nodes are host and port: 'redis://host:port'"
        )
    if options.pop("db", 0):
        raise BrokerConfigurationError("MYAPP_BROKER OPTIONS url names a database; a cluster has only database 0")
    node = [options.pop("host", "127.0.0.1"), options.pop("port", 6379)]
    if connection_class is SSLConnection:
        options["ssl"] = True
    return options, node


class RedisClusterBroker(Broker):
    """Redis (or Valkey) Cluster with sharded pub/sub and a capped stream per channel as history.

    url: any node of the cluster (``"redis://[[user]:password@]host:port"``,
        ``rediss://`` for TLS), or None with ``startup_nodes``; its
        credentials and TLS apply to every node.
    startup_nodes: nodes to read the slot map from, a list of ``[host,
        port]`` pairs, or None (``url``'s node).
    partitions: the number of partitions (int, 1 to MAX_PARTITIONS): one
        position order and one hash slot each; a hub subscribes per node,
        never per channel. Changing it changes every channel's partition:
        streams resuming across the change reset (``malformed`` or
        ``trimmed``); the old keys expire with the history.
    key_prefix: prefix of every key and shard channel (str, no braces).
    socket_timeout, connect_timeout, max_connections (per node): as for
        ``myapp.brokers.redis.RedisBroker``.
    history_length, history_ttl: see ``Broker``.
    """

    def __init__(
        self,
        *,
        url=None,
        startup_nodes=None,
        partitions=16,
        key_prefix="myapp:",
        socket_timeout=5.0,
        connect_timeout=2.0,
        max_connections=50,
        **options,
    ):
        super().__init__(**options)
        if url is None and startup_nodes is None:
            raise BrokerConfigurationError(
                "MYAPP_BROKER OPTIONS: give the cluster as url ('redis://host:port' of any node) or startup_nodes"
            )
        self._options, node = _node_options(url) if url is not None else ({}, None)
        self.startup_nodes = addresses("startup_nodes", startup_nodes, 7000) if startup_nodes else [tuple(node)]
        self.partitions = positive_int("partitions", partitions)
        if self.partitions > MAX_PARTITIONS:
            raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS partitions must be at most {MAX_PARTITIONS}")
        self.prefix = text("key_prefix", key_prefix)
        if "{" in key_prefix or "}" in key_prefix:
            raise BrokerConfigurationError(
                "MYAPP_BROKER OPTIONS key_prefix must not contain braces: the broker sets the keys' hash tags"
            )
        self.socket_timeout = seconds("socket_timeout", socket_timeout)
        self.connect_timeout = seconds("connect_timeout", connect_timeout)
        self.max_connections = positive_int("max_connections", max_connections)
        self.tags, self.slots = tags(self.partitions)
        self.bases = [f"{key_prefix}{{{tag}}}" for tag in self.tags]  # every key of partition p starts so
        self._presence_prefix = key_prefix + "{presence}"
        self._ttl_ms = str(int(self.history_ttl * 1000))
        self._cluster = None
        self._lock = threading.Lock()

    # -- connections -------------------------------------------------------------

    @property
    def _client(self):
        """The process's ``RedisCluster`` client, built on first use (it reads the slot map)."""
        cluster = self._cluster
        if cluster is None:
            with self._lock:
                if self._cluster is None:
                    try:
                        self._cluster = RedisCluster(
                            startup_nodes=[ClusterNode(host, port) for host, port in self.startup_nodes],
                            socket_timeout=self.socket_timeout,
                            socket_connect_timeout=self.connect_timeout,
                            max_connections=self.max_connections,
                            retry=Retry(NoBackoff(), 2),
                            redis_connect_func=self._claim,
                            **self._options,
                        )
                        self._script = self._cluster.register_script(_SHARDED_PUBLISH)
                        self._position_script = self._cluster.register_script(_POSITION)
                    except ERRORS as error:
                        raise unavailable(error) from error
                cluster = self._cluster
        return cluster

    def connection_options(self):
        """Options of a listener's own node connections (dict for ``redis.Connection``)."""
        return {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "redis_connect_func": self._set_up,
            **self._options,
        }

    def owners(self):
        """Read the slot map again; return the address (``"host:port"``) of each partition's primary (list)."""
        client = self._client
        try:
            client.nodes_manager.initialize()
            return [client.nodes_manager.get_node_from_slot(slot).name for slot in self.slots]
        except ERRORS as error:
            raise unavailable(error) from error

    def _set_up(self, connection):
        """Set up a listener's connection as redis-py would, then run ``_claim``."""
        connection.on_connect_check_health(check_health=False)
        self._claim(connection)

    def _claim(self, connection):
        """Record this node as the primary of the partitions it serves; start epochs where it took over.

        Runs on every new connection, before its first command (``redis_connect_func``).
        """
        connection.send_command("CLUSTER", "MYID", check_health=False)
        node = connection.read_response()
        connection.send_command("INFO", "replication", check_health=False)
        info = connection.read_response().decode()
        if "role:master" not in info:
            return
        promoted = "second_repl_offset:-1" not in info
        connection.send_command("CLUSTER", "SLOTS", check_health=False)
        owned = [(start, end) for start, end, primary, *_ in connection.read_response() if primary[2] == node]
        for part, slot in enumerate(self.slots):
            if not any(start <= slot <= end for start, end in owned):
                continue
            base = self.bases[part]
            keys = [base + "ids", base + "epoch", base + "primary"]
            if promoted:
                connection.send_command("EVAL", _PRIMARY, 3, *keys, node, check_health=False)
            else:
                connection.send_command("SET", keys[2], node, check_health=False)
            try:
                changed = connection.read_response()
            except redis.ResponseError:  # the slot is moving: its next owner decides
                continue
            if isinstance(changed, list):
                log.warning(
                    "Redis Cluster: node %s took over partition %d from %s; a new epoch starts at %s there: "
                    "events the old primary had not replicated are gone, so its streams from before it reset",
                    node.decode(),
                    part,
                    changed[0].decode(),
                    changed[1].decode(),
                )

    # -- the contract ------------------------------------------------------------------

    def partition(self, channel):
        return partition_of(channel, self.partitions)

    def _run_script(self, keys, args):
        client = self._client
        try:
            raw = self._script(keys=keys, args=args, client=client)
        except ERRORS as error:
            raise unavailable(error) from error
        return parse(raw.decode())

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        base = self.bases[self.partition(channel)]
        last_key = base + "l:" + channel
        key = last_key if idempotency_key is None else base + "k:" + channel + " " + idempotency_key
        keys = [base + "ids", base + "epoch", base + "h:" + channel, last_key, key]
        flag = "0" if idempotency_key is None else "1"
        return self._run_script(
            keys, [base + "c:" + channel, event_type, data, str(self.history_length), self._ttl_ms, flag]
        )

    def publish_marker(self, hub_channel, part):
        """Publish an empty marker on ``hub_channel`` in partition ``part``; return its position."""
        base = self.bases[part]
        key = base + "ids"
        return self._run_script(
            [key, base + "epoch", key, key, key], [base + "c:" + hub_channel, "marker", "", "0", self._ttl_ms, "0"]
        )

    def _head(self, part):
        """The newest position of ``part`` and its epoch, starting one if it has none."""
        base = self.bases[part]
        head, epoch = self._position_script(keys=[base + "ids", base + "epoch"], client=self._client)
        return parse(head.decode()), parse(epoch.decode())

    def heads(self):
        client = self._client
        try:
            with client.pipeline(transaction=False) as pipe:
                for base in self.bases:
                    pipe.xrevrange(base + "ids", count=1)
                newest = pipe.execute()
            return [parse(found[0][0].decode()) if found else self._head(part)[0] for part, found in enumerate(newest)]
        except ERRORS as error:
            raise unavailable(error) from error

    def last_position(self):
        """The newest position of any partition (int): positions of two partitions do not compare otherwise."""
        return max(self.heads())

    def history(self, channels, after):
        channels = list(dict.fromkeys(channels))
        parts = [self.partition(channel) for channel in channels]
        starts = [after if type(after) is int else after[part] for part in parts]
        read = sorted(set(parts))
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for part in read:
                    pipe.get(self.bases[part] + "epoch")
                for channel, part, start in zip(channels, parts, starts, strict=True):
                    # No COUNT: see RedisBroker.history.
                    pipe.xrange(self.bases[part] + "h:" + channel, "(" + format_id(start), "+")
                results = pipe.execute()
            epochs = [0] * self.partitions
            for part, raw in zip(read, results, strict=False):
                epochs[part] = parse(raw.decode()) if raw is not None else self._head(part)[1]
        except ERRORS as error:
            raise unavailable(error) from error
        events, trimmed = [], set()
        for channel, part, start, entries in zip(channels, parts, starts, results[len(read) :], strict=True):
            retained = channel_events(channel, entries, part)
            if 0 < start < epochs[part] or (retained and retained[0].prev > start):
                trimmed.add(channel)
            events.extend(retained)
        events.sort(key=lambda event: event.pos)
        return History(events, frozenset(trimmed), tuple(epochs))

    presence_update = RedisBroker.presence_update
    presence_read = RedisBroker.presence_read

    def close(self):
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()


from .listener import ClusterListener  # noqa: E402 - the listener needs the broker's module first

RedisClusterBroker.listener_class = ClusterListener
