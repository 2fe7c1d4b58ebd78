"""The Redis pub/sub broker (default): fan-out across processes and hosts.

Keys, under ``key_prefix`` (default ``"myapp:"``):

- ``ids``: a stream of one entry whose ids are the positions handed out:
  ``XADD ids MAXLEN 1 *`` gives the next one (the server's clock in
  milliseconds and a sequence, never below the last id, also after the clock
  stepped back or a failover to a replica with the stream);
- ``epoch``: the position where this server's retained order begins (set
  with the first event after the server had no epoch: first use, or a
  restart that lost its data; with Sentinel, also when a new primary takes
  over);
- ``primary`` (Sentinel only): the address of the primary that wrote last,
  as the Sentinels report it;
- ``h:<channel>``: the channel's history, a Redis stream whose entry ids are
  the event positions, with fields ``t`` (event type), ``d`` (data) and ``p``
  (the channel's previous position, or ``epoch`` for its first event, to
  detect gaps). Capped at ``history_length`` entries with ``MAXLEN ~``
  (whole stream nodes: up to ``stream-node-max-entries``, 100, more are kept)
  and expiring ``history_ttl`` after the channel's last publish; age is
  enforced by the resume rule (``myapp.resume``), not per entry;
- ``l:<channel>``: the channel's last position (the next event's ``p``),
  expiring with the history;
- ``k:<channel> <key>``: a publisher-chosen id, kept ``history_ttl`` seconds
  (a space, outside the channel charset, separates the two);
- pub/sub channel ``c:<channel>``, carrying ``"<id>\\n<event type>\\n<data>"``.

One Lua script publishes (next position, history, ``PUBLISH``): scripts run
atomically, so positions increase in the exact order in which subscribers
receive messages, across all channels. It does no string arithmetic (Lua's
string functions cost more on the server than all the commands it calls);
``bench/publish.py`` measures it per command.

Restarts: with persistence (AOF or RDB) the history survives and streams
resume across a restart. A server that lost its data starts a new ``epoch``:
a Last-Event-ID from before it cannot be resumed (``History.trimmed``), as the
events published between it and the loss are gone; the stream resets.

Memory: a stream entry costs its data plus roughly 30-60 bytes; see
docs/benchmarks for the measured cost per 1,000 events.

Sentinel: with ``sentinels`` the broker asks Redis Sentinel for the current
primary of ``service_name`` whenever it opens a connection (redis-py's
``redis.sentinel``), so publishers and each hub's listener follow a
failover. Replication is asynchronous: the replica that takes over may lack
the newest events the old primary accepted (and hubs delivered), and
nothing left knows which. So every connection, before its first command,
compares the primary's address with ``primary``; the first one to find a
different address starts a new ``epoch`` there. Positions from before it
count as trimmed: open streams reset once when their hub reconnects, and a
Last-Event-ID from before it resets (``trimmed``) instead of resuming past
events that are gone. A primary restarted in place (same address) keeps its
epoch, as without Sentinel. See docs/brokers.md.

Sources: redis-py 8 (``BlockingConnectionPool``, ``redis.sentinel``), Redis
docs for XADD (``MAXLEN ~``, ``*`` ids), XRANGE (exclusive ``(`` ranges need
Redis >= 6.2), Redis Sentinel ("High availability with Redis Sentinel").
"""

import logging

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from myapp.events import Event
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from myapp.ids import format_id, parse

from ._wakeup import Waker
from .base import Broker, History, Listener, Subscribed
from .options import positive_int, seconds, text

__all__ = ["RedisBroker"]

log = logging.getLogger("myapp.brokers.redis")

# KEYS: ids, epoch. Returns the newest position, starting an epoch when the
# server has none (first use, or a restart that lost the data).
_POSITION = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if newest[1] then return {newest[1][1], redis.call('GET', KEYS[2])} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'p', '')
redis.call('SET', KEYS[2], id)
return {id, id}
"""

# KEYS: ids, epoch, history stream, the channel's last position, publisher id key.
# ARGV: pub/sub channel, event type, data, history length, ttl (ms), has id.
# The server's own stream ids give the next position (XADD *: its clock in
# ms and a sequence, never below the last one), so no string arithmetic runs
# in Lua, which costs more here than every command the script calls.
_PUBLISH = """
if ARGV[6] == '1' then
  local found = redis.call('GET', KEYS[5])
  if found then return found end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'p', '')
if ARGV[4] ~= '0' then
  local prev = redis.call('GET', KEYS[4])
  if not prev then
    prev = redis.call('GET', KEYS[2])
    if not prev then
      -- No epoch: the server's order starts here, just before this event.
      prev = id
      redis.call('SET', KEYS[2], id)
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'p', '')
    end
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], id, 't', ARGV[2], 'd', ARGV[3], 'p', prev)
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  redis.call('SET', KEYS[4], id, 'PX', ARGV[5])
  if ARGV[6] == '1' then redis.call('SET', KEYS[5], id, 'PX', ARGV[5]) end
end
redis.call('PUBLISH', ARGV[1], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[3])
return id
"""


#: Milliseconds a presence hash lives after its last write (readers drop dead hubs' entries earlier).
_PRESENCE_KEEP_MS = 24 * 3600 * 1000

# KEYS: ids, epoch, primary. ARGV: the address of the primary this connection reached.
# Returns nil, or {previous address, new epoch} when a new primary took over.
_PRIMARY = """
local known = redis.call('GET', KEYS[3])
if known == ARGV[1] then return nil end
redis.call('SET', KEYS[3], ARGV[1])
if not known or redis.call('EXISTS', KEYS[2]) == 0 then return nil end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'p', '')
redis.call('SET', KEYS[2], id)
return {known, id}
"""


def unavailable(error):
    """The BrokerUnavailable for a redis-py (or socket) error."""
    return BrokerUnavailable(f"Redis: {error.__class__.__name__}: {error}")


def channel_events(channel, entries, part=0):
    """The ``Event`` objects of one channel's history entries (XRANGE replies of ``h:<channel>``)."""
    return [
        Event(
            channel,
            parse(raw_id.decode()),
            fields[b"t"].decode(),
            fields[b"d"].decode(),
            parse(fields[b"p"].decode()),
            part,
        )
        for raw_id, fields in entries
    ]


class _SentinelBlockingPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool (finds the primary on connect) with the blocking pool's bound and timeout."""


def addresses(name, value, port=26379):
    """Return option ``name``'s ``value`` as a list of ``(host, port)``; raise BrokerConfigurationError unless
    it is a non-empty list of [host, port] pairs (``port`` is the example's)."""
    fix = f"a non-empty list of [host, port] pairs, e.g. [['10.0.0.1', {port}], ['10.0.0.2', {port}]]"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS {name} must be {fix}, got {value!r}")
    addresses = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not pair[0]
            or type(pair[1]) is not int
            or not 0 < pair[1] < 65536
        ):
            raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS {name} must be {fix}; {pair!r} is not one")
        addresses.append((pair[0], pair[1]))
    return addresses


def _primary_options(url):
    """The connection options ``url`` gives the primary in Sentinel mode: all but its host and port."""
    try:
        options = parse_url(url)
    except (ValueError, TypeError, AttributeError) as error:
        raise BrokerConfigurationError(
            f"MYAPP_BROKER OPTIONS url is not a redis-py URL ({error}); with sentinels it gives only the "
            "database, username, password and TLS of the primary, e.g. 'redis://:password@/0' or 'rediss:///0'"
        ) from None
    connection_class = options.pop("connection_class", None)
    if connection_class is UnixDomainSocketConnection:
        raise BrokerConfigurationError(
            "MYAPP_BROKER OPTIONS url is a unix socket, but Sentinel gives the primary as host and port: "
            "use 'redis://[[username]:password@]/<db>' (or rediss://) with sentinels"
        )
    options.pop("host", None)
    options.pop("port", None)
    if connection_class is SSLConnection:
        options["ssl"] = True
    return options


class RedisBroker(Broker):
    """Redis (or Valkey) pub/sub with a capped stream per channel as history.

    url: the server, e.g. ``"redis://127.0.0.1:6379/0"`` or
        ``"unix:///path/to/redis.sock"`` (redis-py URL syntax). With
        ``sentinels`` only its database, username, password and TLS
        (``rediss://``) apply, to the primary; host and port come from Sentinel.
    sentinels: None for the server at ``url``, or the Redis Sentinels that
        watch the primary: a list of ``[host, port]`` pairs. Every new
        connection asks them for the current primary of ``service_name``.
    service_name: the primary's name in the Sentinels' ``sentinel monitor``
        line (str).
    sentinel_kwargs: redis-py connection options for the Sentinels
        themselves (dict, e.g. ``{"password": "..."}``), or None. Unless
        given, their ``socket_timeout`` and ``socket_connect_timeout`` are
        ``connect_timeout`` and a failed Sentinel is not retried (the next
        one is asked).
    key_prefix: prefix of every key and pub/sub channel (str).
    socket_timeout: seconds a command may wait for the server (float).
    connect_timeout: seconds to open a connection (float).
    max_connections: connections in this process's publishing pool (int);
        the hub's subscriber connection is extra.
    pool_timeout: seconds a publisher waits for a free pooled connection.
    history_length, history_ttl: see ``Broker``.
    """

    def __init__(
        self,
        *,
        url="redis://127.0.0.1:6379/0",
        key_prefix="myapp:",
        socket_timeout=5.0,
        connect_timeout=2.0,
        max_connections=50,
        pool_timeout=5.0,
        sentinels=None,
        service_name="mymaster",
        sentinel_kwargs=None,
        **options,
    ):
        super().__init__(**options)
        socket_timeout = seconds("socket_timeout", socket_timeout)
        connect_timeout = seconds("connect_timeout", connect_timeout)
        pool_timeout = seconds("pool_timeout", pool_timeout)
        max_connections = positive_int("max_connections", max_connections)
        key_prefix = text("key_prefix", key_prefix)
        self._connection_kwargs = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            # One retry on a fresh connection covers a pooled connection that
            # the server closed (e.g. after a restart); no backoff keeps
            # send_event bounded by the timeouts above.
            "retry": Retry(NoBackoff(), 1),
        }
        self.url = url
        self.prefix = key_prefix
        self._presence_prefix = key_prefix
        self.sentinels = None if sentinels is None else addresses("sentinels", sentinels)
        self.service_name = text("service_name", service_name)
        if not self.service_name:
            raise BrokerConfigurationError(
                "MYAPP_BROKER OPTIONS service_name must be the primary's name in the Sentinels' "
                "'sentinel monitor <name> ...' line, got ''"
            )
        if self.sentinels is None:
            try:
                self._pool = redis.BlockingConnectionPool.from_url(
                    url, max_connections=max_connections, timeout=pool_timeout, **self._connection_kwargs
                )
            except (ValueError, TypeError) as error:
                raise BrokerConfigurationError(
                    f"MYAPP_BROKER OPTIONS url is not a redis-py URL ({error}); "
                    "use e.g. 'redis://127.0.0.1:6379/0' or 'unix:///path/to/redis.sock'"
                ) from None
            self._sentinel = None
        else:
            self._connection_kwargs.update(_primary_options(url))
            self._connection_kwargs["redis_connect_func"] = self._on_connect
            self._sentinel = self._sentinel_manager(sentinel_kwargs, connect_timeout)
            self._pool = self._sentinel.master_for(
                self.service_name,
                connection_pool_class=_SentinelBlockingPool,
                max_connections=max_connections,
                timeout=pool_timeout,
                **self._connection_kwargs,
            ).connection_pool
        self._client = redis.Redis(connection_pool=self._pool)
        self._script = self._client.register_script(_PUBLISH)
        self._position_script = self._client.register_script(_POSITION)
        self._ttl_ms = str(int(self.history_ttl * 1000))
        self._head_keys = [self.prefix + "ids", self.prefix + "epoch"]
        self._primary_keys = [*self._head_keys, self.prefix + "primary"]

    def _on_connect(self, connection):
        """Set up a new connection to the primary, starting an epoch if the primary changed (Sentinel mode).

        Runs inside redis-py's ``connect``, before any command of the
        connection's user, so nothing is read or published on a new primary
        before its epoch. A RedisError here fails the connection.
        """
        connection.on_connect_check_health(check_health=False)
        address = f"{connection.host}:{connection.port}"
        connection.send_command("EVAL", _PRIMARY, 3, *self._primary_keys, address, check_health=False)
        changed = connection.read_response()
        if changed:
            previous, epoch = (item.decode() for item in changed)
            log.warning(
                "Redis: the primary of %r moved from %s to %s; a new epoch starts at %s: events the old primary "
                "had not replicated are gone, so streams from before it reset",
                self.service_name,
                previous,
                address,
                epoch,
            )

    def _sentinel_manager(self, sentinel_kwargs, connect_timeout):
        """redis-py's ``Sentinel`` for ``self.sentinels`` (no I/O: it connects on first use)."""
        if sentinel_kwargs is not None and not isinstance(sentinel_kwargs, dict):
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS sentinel_kwargs must be a dict of redis-py connection options "
                f"(e.g. {{'password': '...'}}) or None, got {sentinel_kwargs!r}"
            )
        # A Sentinel that does not answer costs connect_timeout, then the next
        # one is asked; redis-py's default would retry it three times first.
        kwargs = {
            "socket_timeout": connect_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            **(sentinel_kwargs or {}),
        }
        try:
            return Sentinel(self.sentinels, sentinel_kwargs=kwargs)
        except TypeError as error:
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS sentinel_kwargs do not fit redis-py's Redis ({error})"
            ) from None

    def _listener_pool(self, **kwargs):
        """A new pool of one connection for a hub's listener, to the server or the current primary."""
        if self._sentinel is None:
            return redis.ConnectionPool.from_url(self.url, max_connections=1, **kwargs)
        return SentinelConnectionPool(self.service_name, self._sentinel, max_connections=1, **kwargs)

    def _run_script(self, keys, args):
        try:
            raw = self._script(keys=keys, args=args)
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error
        return parse(raw.decode())

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        prefix = self.prefix
        history_key = prefix + "h:" + channel
        last_key = prefix + "l:" + channel
        if idempotency_key is None:
            keys = [*self._head_keys, history_key, last_key, last_key]
            flag = "0"
        else:
            keys = [*self._head_keys, history_key, last_key, prefix + "k:" + channel + " " + idempotency_key]
            flag = "1"
        return self._run_script(
            keys, [prefix + "c:" + channel, event_type, data, str(self.history_length), self._ttl_ms, flag]
        )

    def _publish_marker(self, hub_channel):
        key = self._head_keys[0]
        return self._run_script(
            [*self._head_keys, key, key, key], [self.prefix + "c:" + hub_channel, "marker", "", "0", self._ttl_ms, "0"]
        )

    def last_position(self):
        try:
            head, _ = self._position_script(keys=self._head_keys)
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error
        return parse(head.decode()) or 0

    def history(self, channels, after):
        channels = list(dict.fromkeys(channels))
        start = "(" + format_id(after)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._head_keys[1])
                for channel in channels:
                    # No COUNT: approximate trimming keeps a little more than
                    # history_length, and a replay cut short would skip events.
                    pipe.xrange(self.prefix + "h:" + channel, start, "+")
                raw_epoch, *results = pipe.execute()
            if raw_epoch is None:  # no history at all (lost, nothing published since): start an epoch
                _, raw_epoch = self._position_script(keys=self._head_keys)
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error
        epoch = parse(raw_epoch.decode()) or 0
        events, trimmed = [], set()
        for channel, entries in zip(channels, results, strict=True):
            retained = channel_events(channel, entries)
            # Before the epoch the server lost its data: whatever the channel
            # had after ``after`` is gone, entries or not.
            if 0 < after < epoch or (retained and retained[0].prev > after):
                trimmed.add(channel)
            events.extend(retained)
        events.sort(key=lambda event: event.pos)
        return History(events, frozenset(trimmed), epoch)

    def presence_update(self, hub_id, counts, ttl):
        prefix = self._presence_prefix
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for (key, member), count in counts.items():
                    field = hub_id + " " + member
                    if count:
                        pipe.hset(prefix + "pr:" + key, field, count)
                        # Entries of hubs that died are dropped by readers; this bounds the rest.
                        pipe.pexpire(prefix + "pr:" + key, _PRESENCE_KEEP_MS)
                    else:
                        pipe.hdel(prefix + "pr:" + key, field)
                pipe.set(prefix + "live:" + hub_id, "1", px=max(1, int(ttl * 1000)))
                pipe.execute()
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error

    def presence_read(self, key, *, exclude=None):
        prefix = self._presence_prefix
        try:
            raw = self._client.hgetall(prefix + "pr:" + key)
            if not raw:
                return {}
            entries = []
            for field, count in raw.items():
                hub, _, member = field.decode().partition(" ")
                entries.append((hub, member, int(count)))
            hubs = sorted({hub for hub, _, _ in entries})
            flags = self._client.mget([prefix + "live:" + hub for hub in hubs])
            alive = {hub for hub, flag in zip(hubs, flags, strict=True) if flag}
            dead = [f"{hub} {member}" for hub, member, _ in entries if hub not in alive]
            if dead:
                self._client.hdel(prefix + "pr:" + key, *dead)
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error
        totals = {}
        for hub, member, count in entries:
            if hub in alive and hub != exclude:
                totals[member] = totals.get(member, 0) + count
        return {member: count for member, count in totals.items() if count}

    def close(self):
        self._pool.disconnect()
        if self._sentinel is not None:
            self._sentinel.close()


class RedisListener(Listener):
    """The hub's subscriber connection: commands sent through redis-py, replies read directly.

    redis-py opens the connection (URL, authentication, database, TLS) and
    packs the commands; the replies, which are all pub/sub replies on this
    connection, are read with one ``recv`` per wake-up and split by hiredis's
    RESP parser (per-message ``PubSub.get_message`` costs several times more).
    """

    def __init__(self, broker, hub_channel):
        self._broker = broker
        self._hub_channel = hub_channel
        self._channel_prefix = broker.prefix + "c:"
        self._skip = len(self._channel_prefix)
        self._reader = hiredis.Reader()
        self._waker = Waker()
        # Its own single connection, in RESP2: the hub must see every drop
        # (redis-py would otherwise reconnect and re-subscribe behind its back).
        # With Sentinel it connects to the primary of the moment.
        kwargs = dict(broker._connection_kwargs, retry=Retry(NoBackoff(), 0), protocol=2)
        self._pool = broker._listener_pool(**kwargs)
        self._conn = None
        try:
            self._conn = self._pool.get_connection()
            self._sock = self._conn._sock  # redis-py has no public accessor
            self._fileno = self._sock.fileno()
            self._command("SUBSCRIBE", [hub_channel])
        except (redis.RedisError, OSError, AttributeError) as error:
            self.close()
            raise unavailable(error) from error

    def _command(self, verb, channels):
        names = [self._channel_prefix + channel for channel in channels]
        try:
            for start in range(0, len(names), 1000):
                self._conn.send_command(verb, *names[start : start + 1000], check_health=False)
        except (redis.RedisError, OSError) as error:
            raise unavailable(error) from error

    def subscribe(self, channels):
        self._command("SUBSCRIBE", channels)

    def unsubscribe(self, channels):
        self._command("UNSUBSCRIBE", channels)

    def _items(self):
        items = []
        skip = self._skip
        gets = self._reader.gets
        try:
            while (reply := gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise ValueError(str(reply))
                kind = reply[0]
                if kind == b"message":
                    raw_id, event_type, data = reply[2].decode().split("\n", 2)
                    items.append(Event(reply[1][skip:].decode(), parse(raw_id), event_type, data))
                elif kind == b"subscribe":
                    items.append(Subscribed(reply[1][skip:].decode()))
        except (hiredis.ProtocolError, ValueError, TypeError, IndexError) as error:
            raise BrokerUnavailable(f"Redis: unexpected reply on the subscriber connection: {error}") from error
        return items

    def wait(self, timeout):
        items = self._items()
        if items:
            return items
        try:
            if not self._waker.wait(self._fileno, timeout):
                return []
            data = self._sock.recv(1 << 16)
        except (BlockingIOError, TimeoutError):
            return []
        except (OSError, ValueError) as error:
            raise unavailable(error) from error
        if not data:
            raise BrokerUnavailable("Redis: the server closed the subscriber connection")
        self._reader.feed(data)
        return self._items()

    def wakeup(self):
        self._waker.wakeup()

    def publish_marker(self):
        self._broker._publish_marker(self._hub_channel)

    def close(self):
        try:
            self._pool.disconnect()
        except Exception:  # noqa: BLE001 - closing a broken connection must not raise
            pass
        self._waker.close()


RedisBroker.listener_class = RedisListener
