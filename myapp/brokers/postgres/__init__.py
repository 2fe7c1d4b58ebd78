"""The PostgreSQL broker: LISTEN/NOTIFY, no extra infrastructure.

Use it with ``MYAPP_BROKER = {"BACKEND": "myapp.brokers.postgres.PostgresBroker"}``
and ``"myapp.brokers.postgres"`` in INSTALLED_APPS (its tables and migrations;
``manage.py migrate`` creates them). This module imports no models, so a
project with another broker never loads them.

Publishing runs one short transaction on Django's connection of the
``database`` alias:

1. upsert the single row of ``myapp_postgres_state`` to the next position;
   its row lock is held until COMMIT, so positions increase in commit order,
   which is the order in which PostgreSQL delivers notifications;
2. insert the event into ``myapp_postgres_event`` (the history; the data as
   UTF-8 bytes in a bytea column, so any str the API accepts is stored,
   NUL included), trim the channel to ``history_length`` rows and the table
   to ``history_ttl``;
3. ``SELECT pg_notify(channel, payload)``: the payload carries the event when
   it fits and holds no NUL, else only a reference that the listener
   resolves from the history table (``listener.py``).

Reads (``last_position``, ``history``, called by the hub from its own
greenlet) run on a connection of the broker's own, not Django's: Django's is
per greenlet and would stay checked out for the greenlet's life.

Failures: a lost or unreachable server (OperationalError, InterfaceError,
timeouts) raises BrokerUnavailable; a value PostgreSQL refuses (DataError)
raises InvalidEvent, since retrying it can never succeed.
"""

import threading

import psycopg
from django.db import DataError, InterfaceError, OperationalError, ProgrammingError, connections, transaction

from myapp.events import Event
from myapp.exceptions import BrokerConfigurationError, InvalidEvent
from myapp.ids import SEQ_BITS

from ..base import Broker, History
from . import sql
from .listener import MAX_NOTIFY_BYTES, PostgresListener, decode_data, notify_payload, pg_channel, unavailable

__all__ = ["PostgresBroker", "pg_channel", "MAX_NOTIFY_BYTES"]

APP = "myapp.brokers.postgres"


def _raise_if_tables_missing(error):
    """Raise BrokerConfigurationError naming the fix if psycopg ``error`` is a missing table."""
    if isinstance(error, psycopg.errors.UndefinedTable):
        raise BrokerConfigurationError(
            f"The PostgreSQL broker's tables are missing ({error}): add {APP!r} to INSTALLED_APPS "
            "and run manage.py migrate"
        ) from error


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

    listener_class = PostgresListener
    #: The app holding this backend's tables; the system checks (myapp.E009)
    #: ask for it in INSTALLED_APPS.
    required_app = APP

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
        except DataError as error:
            # Retrying cannot help: it is the event, not the server.
            raise InvalidEvent(f"PostgreSQL cannot store this event: {error}".strip()) from error
        except ProgrammingError as error:
            _raise_if_tables_missing(error.__cause__)
            raise
        except (OperationalError, InterfaceError) as error:
            if not connection.in_atomic_block:
                connection.close()  # the next call reconnects (e.g. after a server restart)
            raise unavailable(error) from error

    def publish(self, channel, event_type, data, *, idempotency_key=None):
        key = idempotency_key
        try:
            stored = data.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEvent("data is not valid Unicode text (lone surrogate)") from None

        def work(cursor):
            cursor.execute(sql.NEXT_POSITION, {"seq_bits": SEQ_BITS})
            pos = cursor.fetchone()[0]
            cutoff = pos - self._ttl_positions
            if key is not None:
                cursor.execute(sql.FIND_KEY, {"channel": channel, "key": key, "cutoff": cutoff})
                found = cursor.fetchone()
                if found is not None:
                    return found[0]
            cursor.execute(
                sql.INSERT,
                {
                    "channel": channel,
                    "pos": pos,
                    "event_type": event_type,
                    "data": stored,
                    "key": key,
                    "keep": self.history_length - 1,
                    "cutoff": cutoff,
                    "pg_channel": pg_channel(channel, self.prefix),
                    "payload": notify_payload(pos, event_type, channel, data),
                },
            )
            return pos

        return self._run(work)

    def _read(self, query, params, *, rows=True):
        """Run ``query`` on the broker's own connection (autocommit) and return its rows (or None).

        The hub reads positions and history, and writes presence, from its
        own threads: a connection of the broker's (not Django's, which is
        per greenlet and would stay checked out for the greenlet's life)
        serves them. It opens on first use and again after a failure.
        """
        with self._reader_lock:
            conn = self._reader
            try:
                if conn is None or conn.closed:
                    conn = self._reader = psycopg.connect(**self.connection_params(), autocommit=True)
                    conn.execute("SELECT set_config('statement_timeout', %s, false)", [self._timeout_ms])
                cursor = conn.execute(query, params)
                return cursor.fetchall() if rows else None
            except psycopg.Error as error:
                _raise_if_tables_missing(error)
                self._reader = None
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                    pass
                raise unavailable(error) from error

    def last_position(self):
        rows = self._read(sql.LAST_POSITION, None)
        return rows[0][0] if rows else 0

    def history(self, channels, after):
        events, seen, trimmed = [], set(), set()
        for channel, pos, prev, event_type, data in self._read(
            sql.HISTORY, {"channels": list(set(channels)), "after": after}
        ):
            if channel not in seen:
                seen.add(channel)
                if prev > after:
                    trimmed.add(channel)
            events.append(Event(channel, pos, event_type, decode_data(data), prev))
        return History(events, frozenset(trimmed))

    def presence_update(self, hub_id, counts, ttl):
        statements = [
            (
                sql.PRESENCE_SET if count else sql.PRESENCE_DELETE,
                {"key": key, "hub": hub_id, "member": member, "count": count},
            )
            for (key, member), count in counts.items()
        ]
        statements.append((sql.PRESENCE_ALIVE, {"hub": hub_id, "ttl_ms": max(1, int(ttl * 1000))}))
        statements.append((sql.PRESENCE_FORGET, {"grace_ms": int(self.history_ttl * 1000)}))
        for query, params in statements:
            self._read(query, params, rows=False)

    def presence_read(self, key, *, exclude=None):
        rows = self._read(sql.PRESENCE_READ, {"key": key, "exclude": exclude or ""})
        return {member: int(total) for member, total in rows}

    def close(self):
        with self._reader_lock:
            conn, self._reader = self._reader, None
        if conn is not None:
            conn.close()

    def check(self):
        from django.apps import apps
        from django.core import checks

        errors = []
        app = self.required_app
        if not apps.is_installed(app):
            errors.append(
                checks.Error(
                    f"{type(self).__name__} keeps its history in the tables of the app {app!r}, "
                    "which is not in INSTALLED_APPS.",
                    hint=f'Add "{app}" to INSTALLED_APPS, then run "python manage.py migrate".',
                    id="myapp.E009",
                )
            )
        alias = self.database
        if alias not in connections.settings:
            errors.append(
                checks.Error(
                    f"The PostgreSQL broker uses database alias {alias!r}, which is not in DATABASES.",
                    hint="Set MYAPP_BROKER OPTIONS 'database' to a PostgreSQL alias of DATABASES.",
                    id="myapp.E003",
                )
            )
        elif connections[alias].vendor != "postgresql":
            errors.append(
                checks.Error(
                    f"The PostgreSQL broker needs a PostgreSQL database, but DATABASES[{alias!r}] "
                    f"is {connections[alias].vendor}.",
                    hint=f"Point DATABASES[{alias!r}] at PostgreSQL (django.db.backends.postgresql), "
                    "or use the Redis broker.",
                    id="myapp.E004",
                )
            )
        return errors

    def connection_params(self):
        """Return keyword arguments for ``psycopg.connect`` to the ``database`` alias's server."""
        params = connections[self.database].get_connection_params()
        for name in ("cursor_factory", "context"):
            params.pop(name, None)
        params.setdefault("connect_timeout", self.connect_timeout)
        return params
