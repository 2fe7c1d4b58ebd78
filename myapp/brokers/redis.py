"""The Redis pub/sub broker (default): fan-out across processes and hosts.

Keys, under ``key_prefix`` (default ``"myapp:"``):

- ``pos``: the newest position handed out, as ``"<ms>-<seq>"``;
- ``epoch``: the position where this server's history begins (set with
  ``pos`` when the server has none, e.g. after a restart that lost its data);
- ``h:<channel>``: the channel's history, a Redis stream whose entry ids are
  the event positions, with fields ``t`` (event type), ``d`` (data) and ``p``
  (the channel's previous position, or ``epoch`` for its first event, to
  detect gaps). Capped at ``history_length`` entries (exact ``MAXLEN``) and
  ``history_ttl`` seconds (``XTRIM MINID``); the key expires ``history_ttl``
  after the last publish;
- ``k:<channel> <key>``: a publisher-chosen id, kept ``history_ttl`` seconds
  (a space, outside the channel charset, separates the two);
- pub/sub channel ``c:<channel>``, carrying ``"<id>\\n<event type>\\n<data>"``.

One Lua script does it all (next position from the server's ``TIME``,
history, ``PUBLISH``): scripts run atomically, so positions increase in the
exact order in which subscribers receive messages, across all channels.

Restarts: with persistence (AOF or RDB) the history survives and streams
resume across a restart. A server that lost its data starts a new ``epoch``:
a Last-Event-ID from before it cannot be resumed (``History.trimmed``), as the
events published between it and the loss are gone; the stream resets.

Memory: a stream entry costs its data plus roughly 30-60 bytes; see
docs/benchmarks for the measured cost per 1,000 events.

Sources: redis-py 8 (``PubSub.get_message``, ``BlockingConnectionPool``),
Redis docs for XADD/XTRIM/XRANGE (exclusive ``(`` ranges need Redis >= 6.2).
"""

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from myapp.events import Event
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from myapp.ids import format_id, parse

from ._wakeup import Waker
from .base import Broker, History, Listener, Subscribed
from .options import positive_int, seconds, text

__all__ = ["RedisBroker"]

# KEYS: pos, epoch. Returns the newest position, starting a new epoch when
# the server has none (first use, or a restart that lost the data).
_HEAD = """
local function head()
  local last = redis.call('GET', KEYS[1])
  if last then return last end
  local t = redis.call('TIME')
  last = string.format('%d-0', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[1], last)
  redis.call('SET', KEYS[2], last)
  return last
end
"""

_POSITION = (
    _HEAD
    + """
return {head(), redis.call('GET', KEYS[2])}
"""
)

# KEYS: pos, epoch, history stream, publisher id key.
# ARGV: pub/sub channel, event type, data, history length, ttl (ms), has id.
_PUBLISH = (
    _HEAD
    + """
if ARGV[6] == '1' then
  local found = redis.call('GET', KEYS[4])
  if found then return found end
end
local last = head()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms, seq = now, 0
local dash = string.find(last, '-', 1, true)
local last_ms = tonumber(string.sub(last, 1, dash - 1))
if last_ms >= now then
  ms = last_ms
  seq = tonumber(string.sub(last, dash + 1)) + 1
  if seq > 4194303 then ms = ms + 1; seq = 0 end
end
local id = string.format('%d-%d', ms, seq)
redis.call('SET', KEYS[1], id)
local length = tonumber(ARGV[4])
if length > 0 then
  local ttl = tonumber(ARGV[5])
  local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  local prev
  if newest[1] then prev = newest[1][1] else prev = redis.call('GET', KEYS[2]) end
  redis.call('XADD', KEYS[3], 'MAXLEN', length, id, 't', ARGV[2], 'd', ARGV[3], 'p', prev)
  redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d', now - ttl))
  redis.call('PEXPIRE', KEYS[3], ttl)
  if ARGV[6] == '1' then redis.call('SET', KEYS[4], id, 'PX', ttl) end
end
redis.call('PUBLISH', ARGV[1], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[3])
return id
"""
)


def _unavailable(error):
    return BrokerUnavailable(f"Redis: {error.__class__.__name__}: {error}")


class RedisBroker(Broker):
    """Redis (or Valkey) pub/sub with a capped stream per channel as history.

    url: the server, e.g. ``"redis://127.0.0.1:6379/0"`` or
        ``"unix:///path/to/redis.sock"`` (redis-py URL syntax).
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
        try:
            self._pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=pool_timeout, **self._connection_kwargs
            )
        except (ValueError, TypeError) as error:
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS url is not a redis-py URL ({error}); "
                "use e.g. 'redis://127.0.0.1:6379/0' or 'unix:///path/to/redis.sock'"
            ) from None
        self.url = url
        self.prefix = key_prefix
        self._client = redis.Redis(connection_pool=self._pool)
        self._script = self._client.register_script(_PUBLISH)
        self._position_script = self._client.register_script(_POSITION)
        self._ttl_ms = int(self.history_ttl * 1000)
        self._head_keys = [self.prefix + "pos", self.prefix + "epoch"]

    def _run_script(self, channel_key, history_key, key_key, event_type, data, length, has_key):
        try:
            raw = self._script(
                keys=[*self._head_keys, history_key, key_key],
                args=[channel_key, event_type, data, length, self._ttl_ms, "1" if has_key else "0"],
            )
        except (redis.RedisError, OSError) as error:
            raise _unavailable(error) from error
        return parse(raw.decode())

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        key = idempotency_key
        history_key = self.prefix + "h:" + channel
        key_key = self.prefix + "k:" + channel + " " + key if key is not None else history_key
        return self._run_script(
            self.prefix + "c:" + channel, history_key, key_key, event_type, data, self.history_length, key is not None
        )

    def _publish_marker(self, hub_channel):
        pos_key = self.prefix + "pos"
        return self._run_script(self.prefix + "c:" + hub_channel, pos_key, pos_key, "marker", "", 0, False)

    def last_position(self):
        try:
            head = self._client.get(self._head_keys[0])
            if head is None:  # no history yet (or lost): start an epoch
                head, _ = self._position_script(keys=self._head_keys)
        except (redis.RedisError, OSError) as error:
            raise _unavailable(error) from error
        return parse(head.decode()) or 0

    def history(self, channels, after):
        channels = list(dict.fromkeys(channels))
        start = "(" + format_id(after)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._head_keys[1])
                for channel in channels:
                    pipe.xrange(self.prefix + "h:" + channel, start, "+", count=self.history_length)
                raw_epoch, *results = pipe.execute()
            if raw_epoch is None:  # no history at all (lost, nothing published since): start an epoch
                _, raw_epoch = self._position_script(keys=self._head_keys)
        except (redis.RedisError, OSError) as error:
            raise _unavailable(error) from error
        epoch = parse(raw_epoch.decode()) or 0
        events, trimmed = [], set()
        for channel, entries in zip(channels, results, strict=True):
            for raw_id, fields in entries:
                prev = parse(fields[b"p"].decode())
                events.append(
                    Event(channel, parse(raw_id.decode()), fields[b"t"].decode(), fields[b"d"].decode(), prev)
                )
            # Before the epoch the server lost its data: whatever the channel
            # had after ``after`` is gone, entries or not.
            if 0 < after < epoch or (entries and events[-len(entries)].prev > after):
                trimmed.add(channel)
        events.sort(key=lambda event: event.pos)
        return History(events, frozenset(trimmed), epoch)

    def close(self):
        self._pool.disconnect()


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
        kwargs = dict(broker._connection_kwargs, retry=Retry(NoBackoff(), 0), protocol=2)
        self._pool = redis.ConnectionPool.from_url(broker.url, max_connections=1, **kwargs)
        self._conn = None
        try:
            self._conn = self._pool.get_connection()
            self._sock = self._conn._sock  # redis-py has no public accessor
            self._fileno = self._sock.fileno()
            self._command("SUBSCRIBE", [hub_channel])
        except (redis.RedisError, OSError, AttributeError) as error:
            self.close()
            raise _unavailable(error) from error

    def _command(self, verb, channels):
        names = [self._channel_prefix + channel for channel in channels]
        try:
            for start in range(0, len(names), 1000):
                self._conn.send_command(verb, *names[start : start + 1000], check_health=False)
        except (redis.RedisError, OSError) as error:
            raise _unavailable(error) from error

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
            raise _unavailable(error) from error
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
