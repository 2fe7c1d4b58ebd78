"""The outbox of a PostgreSQL database: advisory lock, SKIP LOCKED batches, LISTEN for new rows (see the package)."""

import os
from contextlib import contextmanager

from django.db import connections

from myapp.brokers._wakeup import Waker

from .. import NOTIFY_CHANNEL
from . import _COLUMNS, _TABLE, LOCK_KEY, STATEMENT_TIMEOUT_SECONDS, SourceUnavailable, _row

__all__ = ["PostgresSource"]


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
