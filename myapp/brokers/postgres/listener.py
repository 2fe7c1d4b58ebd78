"""LISTEN/NOTIFY for the PostgreSQL broker: channel names, payloads, the hub's listener.

Channel names map onto PostgreSQL identifiers (at most 63 bytes) as
``<prefix><name>`` when that fits and ``<prefix>#<blake2b hex>`` otherwise,
always quoted with ``psycopg.sql.Identifier``; every payload names its channel,
so a hash collision cannot misdeliver.

A payload is ``"<position>\\n<event type>\\n<channel>\\n<data>"`` when it fits
(PostgreSQL refuses 8000 bytes or more) and is text PostgreSQL can carry (no
NUL); otherwise only ``"<position>\\n<event type>\\n<channel>"``, a reference
that the listener resolves from the history table.

Each worker process holds one LISTEN connection, owned by its hub greenlet:
LISTEN/UNLISTEN run only there; it waits on the socket with ``select``
(cooperative under gevent) and drains with ``notifies(timeout=0)``.

Sources: PostgreSQL docs "NOTIFY" (payload limit, delivery at commit, in
commit order), psycopg 3 docs "Asynchronous notifications" and ``notifies``.
"""

import hashlib
import logging

import psycopg
from psycopg import sql as pgsql

from myapp.events import Event
from myapp.exceptions import BrokerUnavailable
from myapp.ids import SEQ_BITS

from .._wakeup import Waker
from ..base import Listener, Subscribed, Trimmed
from . import sql

__all__ = ["PostgresListener", "pg_channel", "notify_payload", "decode_data", "MAX_NOTIFY_BYTES"]

#: Largest NOTIFY payload in bytes (PostgreSQL refuses 8000 and more).
MAX_NOTIFY_BYTES = 7999
_MAX_IDENTIFIER_BYTES = 63
log = logging.getLogger("myapp.brokers")


def pg_channel(channel, prefix="myapp:"):
    """Return the PostgreSQL NOTIFY channel (str, at most 63 bytes) for a channel name."""
    name = prefix + channel
    if len(name.encode("utf-8")) <= _MAX_IDENTIFIER_BYTES and "\0" not in name:
        return name
    return prefix + "#" + hashlib.blake2b(channel.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def notify_payload(pos, event_type, channel, data):
    """Return the NOTIFY payload (str): the event inline, or only its reference.

    The reference form is used when the inline one would pass MAX_NOTIFY_BYTES
    or contains NUL (a NOTIFY payload is PostgreSQL text, which cannot).
    """
    head = f"{pos}\n{event_type}\n{channel}"
    if "\0" in data:
        return head
    inline = f"{head}\n{data}"
    if len(inline) * 4 <= MAX_NOTIFY_BYTES or len(inline.encode("utf-8")) <= MAX_NOTIFY_BYTES:
        return inline
    return head


def decode_data(stored):
    """Return the event data (str) from the bytea column (bytes or memoryview of UTF-8)."""
    return bytes(stored).decode("utf-8")


def unavailable(error):
    """Return the BrokerUnavailable for a connection failure ``error``."""
    return BrokerUnavailable(f"PostgreSQL: {error.__class__.__name__}: {error}".strip())


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
            raise unavailable(error) from error
        self.subscribe([hub_channel])

    def _execute(self, query, params=None):
        try:
            return self._conn.execute(query, params)
        except psycopg.Error as error:
            raise unavailable(error) from error

    def subscribe(self, channels):
        names = []
        for channel in channels:
            name = pg_channel(channel, self._prefix)
            holders = self._names.setdefault(name, set())
            if not holders:
                names.append(name)
            holders.add(channel)
        if names:
            self._execute(pgsql.SQL("; ").join(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(n)) for n in names))
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
            self._execute(pgsql.SQL("; ").join(pgsql.SQL("UNLISTEN {}").format(pgsql.Identifier(n)) for n in names))

    def _drain(self):
        items = [Subscribed(channel) for channel in self._confirm]
        self._confirm.clear()
        while True:
            try:
                notifies = list(self._conn.notifies(timeout=0))
            except psycopg.Error as error:
                raise unavailable(error) from error
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
                    row = self._execute(sql.FETCH, (channel, pos)).fetchone()
                    if row is None:
                        # Trimmed before we could read it: a stream on this
                        # channel would have a gap, so the hub closes them.
                        items.append(Trimmed(channel, pos))
                        continue
                    data = decode_data(row[0])
                items.append(Event(channel, pos, event_type, data))

    def wait(self, timeout):
        items = self._drain()
        if items:
            return items
        # Replies to this connection's own statements (LISTEN, FETCH, the
        # marker) made the socket readable meanwhile; _drain consumed them.
        self._waker.clear()
        try:
            readable = self._waker.wait(self._conn.fileno(), timeout)
        except (OSError, ValueError, psycopg.Error) as error:
            raise unavailable(error) from error
        return self._drain() if readable else []

    def wakeup(self):
        self._waker.wakeup()

    def publish_marker(self):
        name = pg_channel(self._hub_channel, self._prefix)
        try:
            with self._conn.transaction():
                pos = self._conn.execute(sql.NEXT_POSITION, {"seq_bits": SEQ_BITS}).fetchone()[0]
                self._conn.execute(
                    "SELECT pg_notify(%s, %s)", (name, notify_payload(pos, "marker", self._hub_channel, ""))
                )
        except psycopg.Error as error:
            raise unavailable(error) from error

    def close(self):
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not raise
            pass
        self._waker.close()
