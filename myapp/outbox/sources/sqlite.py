"""The outbox of a SQLite database: a flock picks the active relay; rows are read without a lock and
deleted in BEGIN IMMEDIATE (see the package)."""

import fcntl
import os
import random
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager

from django.db import connections

from . import (
    _COLUMNS,
    _TABLE,
    BUSY_RETRY_SECONDS,
    DELETE_RETRY_SECONDS,
    LOCK_FILE_SUFFIX,
    Busy,
    SourceUnavailable,
    _row,
)

__all__ = ["SQLiteSource"]


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
