"""The relay's side of the outbox table: claim rows in order, delete them, wait for new ones.

A source owns one connection of its own to one database (never Django's:
Django's is per thread or greenlet and pooled, and the relay needs a session
that holds a lock and listens). ``source_for(alias)`` picks the vendor's:

- PostgreSQL (``PostgresSource``): the relay holding the session-level
  advisory lock ``LOCK_KEY`` is the only active one for that database; the
  others stand by and try again every ``MYAPP_OUTBOX_POLL_SECONDS``, and
  one takes over within that interval when the holder's session ends (the
  server releases the lock, also when the process was killed). The active
  one LISTENs on ``myapp_outbox``, which every durable publish signals at
  COMMIT. Each batch is ``SELECT ... ORDER BY id LIMIT n FOR UPDATE SKIP
  LOCKED`` in a transaction that deletes what was published, so even a
  relay that ignored the lock could not publish a row another one holds.
- SQLite (``SQLiteSource``): no advisory locks, no SKIP LOCKED, no NOTIFY.
  The active relay is the one holding a non-blocking ``flock`` on a file next
  to the database (``<NAME>.myapp-outbox-relay.lock``; the kernel releases
  it when the process ends, also on SIGKILL); the others stand by as on
  PostgreSQL. It reads the oldest rows without a lock (a plain read, never
  blocked in WAL mode), publishes them, and deletes them in a ``BEGIN
  IMMEDIATE`` transaction of their own. SQLite's single write lock is never
  held across the broker call: in a gevent worker, a greenlet that held it
  while publishing (a yield) would let another greenlet of the same process
  wait for it in SQLite's busy handler, which sleeps in C and blocks the
  whole worker, relay included, for the busy timeout. The relay's
  connection itself never waits for the lock (``timeout=0``): a taken lock
  is tried again shortly. New rows are noticed by a read every
  ``MYAPP_OUTBOX_POLL_SECONDS``.

Failures: a database that cannot be reached raises ``SourceUnavailable`` (the
relay closes the connection and reconnects with backoff); SQLite's lock held
by another writer raises ``Busy``.

Sources: PostgreSQL docs "Advisory Locks" (session-level locks are released
when the session ends), "SELECT: The Locking Clause" (SKIP LOCKED), "NOTIFY";
SQLite docs "Transaction" (BEGIN IMMEDIATE), "Write-Ahead Logging".
"""

import fcntl
import os
import random
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from typing import NamedTuple

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from myapp.brokers._wakeup import Waker

from . import NOTIFY_CHANNEL
from .models import OutboxEvent

__all__ = ["Row", "SourceUnavailable", "Busy", "PostgresSource", "SQLiteSource", "source_for", "LOCK_KEY"]

#: The PostgreSQL advisory lock (one bigint key, per database) that makes a
#: relay the active one: the bytes "myoutbox". pg_locks shows it as
#: classid 1836674933 ("myou"), objid 1952608120 ("tbox").
LOCK_KEY = int.from_bytes(b"myoutbox", "big")

#: Seconds a relay's PostgreSQL statement may run (none should take long).
STATEMENT_TIMEOUT_SECONDS = 10

#: SQLite: appended to the database file's path to name the file whose flock
#: makes a relay the active one (the kernel releases it when the process ends).
LOCK_FILE_SUFFIX = ".myapp-outbox-relay.lock"
#: SQLite: seconds (range) between two tries of a write lock another connection holds.
BUSY_RETRY_SECONDS = (0.01, 0.05)
#: SQLite: seconds a relay keeps trying to take the write lock for a delete.
DELETE_RETRY_SECONDS = 1.0

_TABLE = OutboxEvent._meta.db_table
_COLUMNS = "id, channel, event_type, data, idempotency_key"


class Row(NamedTuple):
    """One outbox row: its id (int), the event (str fields) and its idempotency key (str)."""

    id: int
    channel: str
    event_type: str
    data: str
    key: str


def _row(values):
    pk, channel, event_type, data, key = values
    return Row(pk, channel, event_type, bytes(data).decode("utf-8"), key)


class SourceUnavailable(Exception):
    """The outbox's database cannot be reached (or its table is missing); the message says which."""


class Busy(Exception):
    """SQLite: another connection holds the write lock; try again in a moment."""


class PostgresSource:
    """The outbox of a PostgreSQL alias, on a connection of the relay's own.

    alias: the Django database alias (str).
    """

    def __init__(self, alias):
        self.alias = alias
        self._conn = None
        self._active = False
        self._waker = Waker()

    def _connect(self):
        import psycopg

        params = connections[self.alias].get_connection_params()
        for name in ("cursor_factory", "context"):
            params.pop(name, None)
        params.setdefault("connect_timeout", 5)  # seconds
        params["application_name"] = f"myapp outbox relay (pid {os.getpid()})"
        try:
            self._conn = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as error:
            raise SourceUnavailable(f"PostgreSQL ({self.alias}): {type(error).__name__}: {error}".strip()) from error
        self._active = False
        self._execute("SELECT set_config('statement_timeout', %s, false)", [str(STATEMENT_TIMEOUT_SECONDS * 1000)])

    def _execute(self, query, params=None):
        import psycopg

        try:
            return self._conn.execute(query, params)
        except psycopg.errors.UndefinedTable as error:
            self.disconnect()
            raise SourceUnavailable(
                f"the outbox table {_TABLE} is missing on {self.alias!r}: run manage.py migrate --database {self.alias}"
            ) from error
        except psycopg.Error as error:
            self.disconnect()
            raise SourceUnavailable(f"PostgreSQL ({self.alias}): {type(error).__name__}: {error}".strip()) from error

    def acquire(self):
        """Connect if needed and try to become the active relay; return True if this one is.

        Raise SourceUnavailable if the database cannot be reached.
        """
        from psycopg import sql

        if self._conn is None:
            self._connect()
        if not self._active:
            (locked,) = self._execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY]).fetchone()
            if locked:
                self._execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                self._active = True
        return self._active

    @contextmanager
    def batch(self, size):
        """Claim the oldest ``size`` rows in a transaction; yield them (a list of Row, ascending id).

        The caller publishes them and calls ``delete`` with the published ids
        before leaving the block, which commits; an exception rolls back.
        """
        from psycopg import sql

        self._execute("BEGIN")
        try:
            cursor = self._execute(
                sql.SQL("SELECT {} FROM {} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED").format(
                    sql.SQL(_COLUMNS), sql.Identifier(_TABLE)
                ),
                [size],
            )
            yield [_row(values) for values in cursor.fetchall()]
            self._execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self):
        if self._conn is None:
            return
        try:
            self._conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a broken connection is dropped below
            self.disconnect()

    def delete(self, ids):
        """Delete the rows ``ids`` (list of int) in the current batch."""
        from psycopg import sql

        self._execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(sql.Identifier(_TABLE)), [list(ids)])

    def wait(self, timeout):
        """Return when a durable publish committed (NOTIFY), ``wakeup`` was called, or ``timeout`` seconds passed.

        Raise SourceUnavailable if the connection was lost meanwhile.
        """
        if self._conn is None:  # lost: the relay reconnects (after its backoff)
            return
        if self._notified():  # arrived during the last batch's statements
            return
        # The batch's own replies made the socket readable while nobody waited;
        # notifies() consumed them, so that readiness is stale.
        self._waker.clear()
        try:
            readable = self._waker.wait(self._conn.fileno(), timeout)
        except (OSError, ValueError) as error:
            self.disconnect()
            raise SourceUnavailable(f"PostgreSQL ({self.alias}): {error}") from error
        if readable:
            self._notified()

    def _notified(self):
        import psycopg

        try:
            return bool(list(self._conn.notifies(timeout=0)))
        except psycopg.Error as error:
            self.disconnect()
            raise SourceUnavailable(f"PostgreSQL ({self.alias}): {type(error).__name__}: {error}".strip()) from error

    def wakeup(self):
        """Make a current or the next ``wait`` return promptly. Safe from any thread or greenlet."""
        self._waker.wakeup()

    @property
    def active(self):
        """True while this relay holds the advisory lock."""
        return self._active

    def disconnect(self):
        """Close the connection (which releases the lock and the LISTEN); the next ``acquire`` reconnects."""
        conn, self._conn = self._conn, None
        self._active = False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                pass

    def close(self):
        self.disconnect()
        self._waker.close()


class SQLiteSource:
    """The outbox of a SQLite alias, on a sqlite3 connection of the relay's own.

    alias: the Django database alias (str); its NAME must be a file that
        other processes can open (not ``:memory:``).
    """

    def __init__(self, alias):
        self.alias = alias
        settings_dict = connections[alias].settings_dict
        self._name = str(settings_dict["NAME"])
        # The host's per-connection pragmas (e.g. journal_mode=WAL), as Django runs them.
        self._init = settings_dict.get("OPTIONS", {}).get("init_command", "")
        path = urllib.parse.urlsplit(self._name).path if self._name.startswith("file:") else self._name
        self.lock_path = f"{path}{LOCK_FILE_SUFFIX}"
        self._conn = None
        self._lock_fd = None
        self._wake = threading.Event()

    def _connect(self):
        try:
            # timeout=0: never wait in SQLite's busy handler (it sleeps in C and
            # would block a whole gevent worker); a taken lock raises Busy.
            conn = sqlite3.connect(self._name, timeout=0, isolation_level=None, check_same_thread=False, uri=True)
            for statement in self._init.split(";"):
                if statement := statement.strip():
                    conn.execute(statement)
        except sqlite3.Error as error:
            raise SourceUnavailable(f"SQLite ({self.alias}): {error}") from error
        self._conn = conn

    def _execute(self, query, params=()):
        try:
            return self._conn.execute(query, params)
        except sqlite3.OperationalError as error:
            message = str(error)
            if "locked" in message or "busy" in message:
                raise Busy(message) from error
            self.disconnect()
            if "no such table" in message:
                raise SourceUnavailable(
                    f"the outbox table {_TABLE} is missing on {self.alias!r}: "
                    f"run manage.py migrate --database {self.alias}"
                ) from error
            raise SourceUnavailable(f"SQLite ({self.alias}): {message}") from error
        except sqlite3.Error as error:
            self.disconnect()
            raise SourceUnavailable(f"SQLite ({self.alias}): {error}") from error

    def acquire(self):
        """Connect if needed and try to become the active relay (the lock file's flock); return True if this one is."""
        if self._conn is None:
            self._connect()
        if self._lock_fd is None:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:
                raise SourceUnavailable(f"SQLite ({self.alias}): cannot open {self.lock_path}: {error}") from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as error:
                os.close(fd)
                raise SourceUnavailable(f"SQLite ({self.alias}): cannot lock {self.lock_path}: {error}") from error
            self._lock_fd = fd
        return True

    @contextmanager
    def batch(self, size):
        """Yield the oldest ``size`` rows (a list of Row, ascending id), read without a lock.

        A plain read, which WAL mode never blocks; ``delete`` then takes the
        write lock for its own short transaction. Raise Busy if the database
        is locked for reading (rollback-journal mode, a writer committing).
        """
        rows = self._execute(f'SELECT {_COLUMNS} FROM "{_TABLE}" ORDER BY id LIMIT ?', [size]).fetchall()
        yield [_row(values) for values in rows]

    def delete(self, ids):
        """Delete the rows ``ids`` (list of int) in a ``BEGIN IMMEDIATE`` transaction of their own.

        The write lock is taken here and nowhere else, and released before
        anything can yield to another greenlet. A taken lock is tried again
        for up to DELETE_RETRY_SECONDS, then Busy is raised (the rows are
        published again later, and delivered once: same idempotency keys).
        """
        ids = list(ids)
        deadline = time.monotonic() + DELETE_RETRY_SECONDS
        while True:
            try:
                self._execute("BEGIN IMMEDIATE")
                break
            except Busy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(*BUSY_RETRY_SECONDS))
        try:
            marks = ", ".join("?" * len(ids))
            self._execute(f'DELETE FROM "{_TABLE}" WHERE id IN ({marks})', ids)
            self._execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self):
        if self._conn is None or not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            self.disconnect()

    def wait(self, timeout):
        """Return after ``timeout`` seconds, or sooner if ``wakeup`` was called."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wakeup(self):
        self._wake.set()

    @property
    def active(self):
        """True while this relay holds the lock file."""
        return self._lock_fd is not None

    def disconnect(self):
        """Close the connection and release the lock file; the next ``acquire`` starts again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def close(self):
        self.disconnect()


#: Database vendors (Django's ``connection.vendor``) a relay can read.
SOURCES = {"postgresql": PostgresSource, "sqlite": SQLiteSource}


def source_for(alias):
    """Return a new source for the outbox of database ``alias``.

    Raise ImproperlyConfigured for an unknown alias or a database vendor
    without a relay (only PostgreSQL and SQLite have one).
    """
    if alias not in connections.settings:
        raise ImproperlyConfigured(f"MYAPP_OUTBOX_DATABASES names {alias!r}, which is not in DATABASES")
    vendor = connections[alias].vendor
    if vendor not in SOURCES:
        raise ImproperlyConfigured(
            f"The outbox relay reads PostgreSQL and SQLite databases; DATABASES[{alias!r}] is {vendor}"
        )
    return SOURCES[vendor](alias)
