"""The PostgreSQL broker: LISTEN/NOTIFY, no extra infrastructure.

Publishing runs one short transaction on Django's connection of the
``database`` alias:

1. upsert the single row of ``myapp_broker_state`` to the next position; its
   row lock is held until COMMIT, so positions increase in commit order, which
   is the order in which PostgreSQL delivers notifications;
2. insert the event into ``myapp_broker_event`` (the history), trim the
   channel to ``history_length`` rows and the table to ``history_ttl``;
3. ``SELECT pg_notify(channel, payload)``: the payload carries the event when
   it fits (PostgreSQL refuses payloads of 8000 bytes or more), else only a
   reference that the listener resolves from the history table.

Each worker process holds one extra LISTEN connection, owned by its hub
greenlet: LISTEN/UNLISTEN run only there; it waits on the socket with
``select`` (cooperative under gevent) and drains with ``notifies(timeout=0)``.

Channel names map onto PostgreSQL identifiers (at most 63 bytes) as
``<prefix><name>`` when that fits and ``<prefix>#<blake2b hex>`` otherwise,
always quoted with ``psycopg.sql.Identifier``; every payload names its channel,
so a hash collision cannot misdeliver. No SQL is built by interpolating text.

Sources: PostgreSQL docs "NOTIFY" (payload limit, delivery at commit, in
commit order), psycopg 3 docs "Asynchronous notifications" and ``notifies``.
"""

import hashlib
import logging
import threading

import psycopg
from django.db import DatabaseError, InterfaceError, connections, transaction
from psycopg import sql

from myapp.events import Event
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from myapp.ids import SEQ_BITS

from ._wakeup import Waker
from .base import Broker, History, Listener, Subscribed, Trimmed

__all__ = ["PostgresBroker", "pg_channel", "MAX_NOTIFY_BYTES"]

#: Largest NOTIFY payload in bytes (PostgreSQL refuses 8000 and more).
MAX_NOTIFY_BYTES = 7999
_MAX_IDENTIFIER_BYTES = 63
log = logging.getLogger("myapp.brokers")

_NEXT_POSITION = (
    "INSERT INTO myapp_broker_state AS s (id, pos) "
    "VALUES (1, (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << %(seq_bits)s) "
    "ON CONFLICT (id) DO UPDATE SET pos = GREATEST(s.pos + 1, EXCLUDED.pos) "
    "RETURNING pos"
)
_FIND_KEY = "SELECT pos FROM myapp_broker_event WHERE channel = %(channel)s AND key = %(key)s AND pos > %(cutoff)s"
_INSERT = """
WITH prev AS (
    SELECT coalesce(max(pos), 0) AS pos FROM myapp_broker_event WHERE channel = %(channel)s
), inserted AS (
    INSERT INTO myapp_broker_event (channel, pos, prev, event_type, data, key)
    SELECT %(channel)s, %(pos)s, prev.pos, %(event_type)s, %(data)s, %(key)s FROM prev
), trimmed AS (
    DELETE FROM myapp_broker_event WHERE channel = %(channel)s AND pos <= (
        SELECT pos FROM myapp_broker_event WHERE channel = %(channel)s ORDER BY pos DESC OFFSET %(keep)s LIMIT 1
    )
), expired AS (
    DELETE FROM myapp_broker_event WHERE pos < %(cutoff)s
)
SELECT pg_notify(%(pg_channel)s, %(payload)s)
"""
_HISTORY = (
    "SELECT channel, pos, prev, event_type, data FROM myapp_broker_event "
    "WHERE channel = ANY(%(channels)s) AND pos > %(after)s ORDER BY pos"
)
_FETCH = "SELECT data FROM myapp_broker_event WHERE channel = %s AND pos = %s"


def pg_channel(channel, prefix="myapp:"):
    """Return the PostgreSQL NOTIFY channel (str, at most 63 bytes) for a channel name."""
    name = prefix + channel
    if len(name.encode("utf-8")) <= _MAX_IDENTIFIER_BYTES and "\0" not in name:
        return name
    return prefix + "#" + hashlib.blake2b(channel.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _payload(pos, event_type, channel, data):
    head = f"{pos}\n{event_type}\n{channel}"
    inline = f"{head}\n{data}"
    if len(inline) * 4 <= MAX_NOTIFY_BYTES or len(inline.encode("utf-8")) <= MAX_NOTIFY_BYTES:
        return inline
    return head  # too big for NOTIFY: the listener reads the data from the history


def _unavailable(error):
    return BrokerUnavailable(f"PostgreSQL: {error.__class__.__name__}: {error}".strip())


class PostgresBroker(Broker):
    """PostgreSQL LISTEN/NOTIFY with a history table.

    database: the Django database alias to use (must be PostgreSQL); its
        connection publishes and reads history, and its settings open each
        process's LISTEN connection.
    channel_prefix: prefix of every NOTIFY channel (str, a few bytes).
    connect_timeout: seconds to open the LISTEN connection (int >= 2, libpq).
    statement_timeout: seconds a publish may take, lock wait included (float).
    history_length, history_ttl: see ``Broker``.
    """

    def __init__(
        self, *, database="default", channel_prefix="myapp:", connect_timeout=5, statement_timeout=5.0, **options
    ):
        super().__init__(**options)
        if not isinstance(database, str):
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS database must be a DATABASES alias (str), got {database!r}"
            )
        if not isinstance(channel_prefix, str) or len(channel_prefix.encode()) > 20:
            raise BrokerConfigurationError("MYAPP_BROKER OPTIONS channel_prefix must be a str of at most 20 bytes")
        if type(connect_timeout) is not int or connect_timeout < 2:
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS connect_timeout must be an int of seconds >= 2 (libpq), got {connect_timeout!r}"
            )
        if not isinstance(statement_timeout, (int, float)) or statement_timeout <= 0:
            raise BrokerConfigurationError(
                f"MYAPP_BROKER OPTIONS statement_timeout must be a number of seconds > 0, got {statement_timeout!r}"
            )
        self.database = database
        self.prefix = channel_prefix
        self.connect_timeout = connect_timeout
        self._timeout_ms = str(int(statement_timeout * 1000))
        self._ttl_positions = int(self.history_ttl * 1000) << SEQ_BITS
        self._reader = None  # the broker's own connection for reads (see _read)
        self._reader_lock = threading.Lock()

    def _run(self, work):
        """Run ``work(cursor)`` in a transaction on Django's connection; map failures."""
        connection = connections[self.database]
        try:
            with transaction.atomic(using=self.database), connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
                    [self._timeout_ms, self._timeout_ms],
                )
                return work(cursor)
        except (DatabaseError, InterfaceError) as error:
            if not connection.in_atomic_block:
                connection.close()  # the next call reconnects (e.g. after a server restart)
            raise _unavailable(error) from error

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        key = idempotency_key

        def work(cursor):
            cursor.execute(_NEXT_POSITION, {"seq_bits": SEQ_BITS})
            pos = cursor.fetchone()[0]
            cutoff = pos - self._ttl_positions
            if key is not None:
                cursor.execute(_FIND_KEY, {"channel": channel, "key": key, "cutoff": cutoff})
                found = cursor.fetchone()
                if found is not None:
                    return found[0]
            cursor.execute(
                _INSERT,
                {
                    "channel": channel,
                    "pos": pos,
                    "event_type": event_type,
                    "data": data,
                    "key": key,
                    "keep": self.history_length - 1,
                    "cutoff": cutoff,
                    "pg_channel": pg_channel(channel, self.prefix),
                    "payload": _payload(pos, event_type, channel, data),
                },
            )
            return pos

        return self._run(work)

    def _read(self, query, params):
        """Run a read-only ``query`` on the broker's own connection and return its rows.

        The hub reads positions and history from its own greenlet; a
        connection of the broker's (not Django's, which is per greenlet and
        would stay checked out for the greenlet's life) serves those reads,
        opened on first use and again after a failure.
        """
        with self._reader_lock:
            conn = self._reader
            try:
                if conn is None or conn.closed:
                    conn = self._reader = psycopg.connect(**self.connection_params(), autocommit=True)
                    conn.execute("SELECT set_config('statement_timeout', %s, false)", [self._timeout_ms])
                return conn.execute(query, params).fetchall()
            except psycopg.Error as error:
                self._reader = None
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                    pass
                raise _unavailable(error) from error

    def last_position(self):
        rows = self._read("SELECT pos FROM myapp_broker_state WHERE id = 1", None)
        return rows[0][0] if rows else 0

    def history(self, channels, after):
        events, seen, trimmed = [], set(), set()
        for channel, pos, prev, event_type, data in self._read(
            _HISTORY, {"channels": list(set(channels)), "after": after}
        ):
            if channel not in seen:
                seen.add(channel)
                if prev > after:
                    trimmed.add(channel)
            events.append(Event(channel, pos, event_type, data, prev))
        return History(events, frozenset(trimmed))

    def close(self):
        with self._reader_lock:
            conn, self._reader = self._reader, None
        if conn is not None:
            conn.close()

    def connection_params(self):
        """Return keyword arguments for ``psycopg.connect`` to the ``database`` alias's server."""
        params = connections[self.database].get_connection_params()
        for name in ("cursor_factory", "context"):
            params.pop(name, None)
        params.setdefault("connect_timeout", self.connect_timeout)
        return params


class PostgresListener(Listener):
    def __init__(self, broker, hub_channel):
        self._broker = broker
        self._prefix = broker.prefix
        self._hub_channel = hub_channel
        self._names = {}  # NOTIFY channel -> set of our channel names
        self._confirm = []
        self._waker = Waker()
        try:
            self._conn = psycopg.connect(**broker.connection_params(), autocommit=True)
        except psycopg.Error as error:
            self._waker.close()
            raise _unavailable(error) from error
        self.subscribe([hub_channel])

    def _execute(self, query, params=None):
        try:
            return self._conn.execute(query, params)
        except psycopg.Error as error:
            raise _unavailable(error) from error

    def subscribe(self, channels):
        names = []
        for channel in channels:
            name = pg_channel(channel, self._prefix)
            holders = self._names.setdefault(name, set())
            if not holders:
                names.append(name)
            holders.add(channel)
        if names:
            self._execute(sql.SQL("; ").join(sql.SQL("LISTEN {}").format(sql.Identifier(name)) for name in names))
        self._confirm.extend(channels)

    def unsubscribe(self, channels):
        names = []
        for channel in channels:
            name = pg_channel(channel, self._prefix)
            holders = self._names.get(name)
            if holders is None:
                continue
            holders.discard(channel)
            if not holders:
                del self._names[name]
                names.append(name)
        if names:
            self._execute(sql.SQL("; ").join(sql.SQL("UNLISTEN {}").format(sql.Identifier(name)) for name in names))

    def _drain(self):
        items = [Subscribed(channel) for channel in self._confirm]
        self._confirm.clear()
        while True:
            try:
                notifies = list(self._conn.notifies(timeout=0))
            except psycopg.Error as error:
                raise _unavailable(error) from error
            if not notifies:
                return items
            for notify in notifies:
                parts = notify.payload.split("\n", 3)
                try:
                    pos, event_type, channel = int(parts[0]), parts[1], parts[2]
                except (ValueError, IndexError):
                    log.warning("ignoring a foreign NOTIFY on %r", notify.channel)
                    continue
                if len(parts) == 4:
                    data = parts[3]
                else:
                    row = self._execute(_FETCH, (channel, pos)).fetchone()
                    if row is None:
                        # Trimmed before we could read it: a stream on this
                        # channel would have a gap, so the hub closes them.
                        items.append(Trimmed(channel, pos))
                        continue
                    data = row[0]
                items.append(Event(channel, pos, event_type, data))

    def wait(self, timeout):
        items = self._drain()
        if items:
            return items
        try:
            readable = self._waker.wait(self._conn.fileno(), timeout)
        except (OSError, ValueError, psycopg.Error) as error:
            raise _unavailable(error) from error
        return self._drain() if readable else []

    def wakeup(self):
        self._waker.wakeup()

    def publish_marker(self):
        name = pg_channel(self._hub_channel, self._prefix)
        try:
            with self._conn.transaction():
                pos = self._conn.execute(_NEXT_POSITION, {"seq_bits": SEQ_BITS}).fetchone()[0]
                self._conn.execute("SELECT pg_notify(%s, %s)", (name, _payload(pos, "marker", self._hub_channel, "")))
        except psycopg.Error as error:
            raise _unavailable(error) from error

    def close(self):
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not raise
            pass
        self._waker.close()


PostgresBroker.listener_class = PostgresListener
