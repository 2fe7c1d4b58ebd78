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

from typing import NamedTuple

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from ..models import OutboxEvent

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


from .postgres import PostgresSource  # noqa: E402 - they use the names above
from .sqlite import SQLiteSource  # noqa: E402

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
