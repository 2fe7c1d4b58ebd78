"""The relay: publish one database's outbox to the broker, in order, until stopped.

Loop: become the active relay (``myapp.outbox.sources``; standbys wait and try again),
then in batches of ``batch_size`` rows: claim the oldest rows, publish each
with its idempotency key in ``id`` order, delete the published ones, commit.
When the outbox is empty, wait for a NOTIFY (PostgreSQL) or the poll
interval, and start again.

Exactly once: a row is deleted in the transaction that claimed it, after the
broker took it. A relay that dies between the two leaves the row to the next
batch, which publishes it again with the same idempotency key: the broker
delivers nothing the second time (within its ``history_ttl``).

In order: one relay per database publishes at a time, oldest row first, and
stops at the first failure (publishing nothing after a row that failed), so
the events of a channel reach the broker in the order their transactions
committed (for events written one after another, e.g. by one job).

Faults: while the broker is down (``BrokerUnavailable``) the relay keeps the
rows, logs once, and retries with jittered exponential backoff (``backoff``:
0.1 s doubling to 5 s); each retry first asks the broker for its newest
position, outside any transaction, so no database lock is held while the
broker cannot answer. Its own database connection lost: logged once,
reconnected with the same backoff. A row the broker refuses for good
(``InvalidEvent``, e.g. a value the PostgreSQL broker cannot store) is
logged as an error and deleted, so it cannot block the rows behind it.
"""

import logging
import random
import threading
import time

from django.db import connections

from myapp import metrics
from myapp.exceptions import BrokerUnavailable, InvalidEvent

from .sources import BUSY_RETRY_SECONDS, Busy, SourceUnavailable

__all__ = ["Relay", "BATCH_SIZE"]

log = logging.getLogger("myapp.outbox")

#: Rows one batch (one transaction) claims, publishes and deletes.
BATCH_SIZE = 100


class Relay:
    """Publish the rows of one outbox source to the broker until ``stop``.

    source: a ``myapp.outbox.sources`` source (one database).
    get_broker: callable returning the broker to publish to; called for
        every batch, so a broker rebuilt after a settings change is used.
    poll_seconds: seconds between looks at the outbox when nothing signals
        a new row, and between a standby's tries to become active (float).
    batch_size: rows per transaction (int).
    backoff: (first, max) seconds between retries while the broker or the
        database is down; each wait is jittered between half and all of it.
    """

    def __init__(self, source, *, get_broker, poll_seconds, batch_size=BATCH_SIZE, backoff=(0.1, 5.0)):
        self.source = source
        self.get_broker = get_broker
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.backoff = backoff
        self.published = 0  # rows published and deleted by this relay
        self.active = False
        self._role = None  # the role last logged: True active, False standing by
        self._stop = threading.Event()
        self._broker_down = False
        self._outages = {}  # "broker" | "database" -> time.monotonic() when it began

    def __repr__(self):
        return f"<Relay {self.source.alias!r} {'active' if self.active else 'standby'}>"

    def stop(self):
        """Make ``run`` return after the current batch. Safe from any thread or greenlet."""
        self._stop.set()
        self.source.wakeup()

    def run(self):
        """Relay until ``stop`` is called. Never raises."""
        delay = self.backoff[0]
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    delay = self.backoff[0]
                except Busy:
                    self._stop.wait(random.uniform(*BUSY_RETRY_SECONDS))
                except (BrokerUnavailable, SourceUnavailable) as error:
                    self._down("broker" if isinstance(error, BrokerUnavailable) else "database", error)
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff[1])
                except Exception:  # noqa: BLE001 - a bug must not end the relay for good
                    log.exception("outbox relay (%s): unexpected error; retrying", self.source.alias)
                    self.source.disconnect()
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff[1])
        finally:
            self.active = False
            self.source.close()
            _release_django_connections()

    def _step(self):
        """One round: probe the broker after a failure, become active, drain, wait."""
        if self._broker_down:
            self.get_broker().last_position()  # raises BrokerUnavailable while it is still down
            self._broker_down = False
            self._up("broker")
        self.active = active = self.source.acquire()
        self._up("database")
        if active != self._role:
            self._role = active
            if active:
                log.info("outbox relay (%s): active", self.source.alias)
            else:
                log.info("outbox relay (%s): standing by, another relay is the active one", self.source.alias)
        if active:
            self._drain()
        self.source.wait(self.poll_seconds)

    def _drain(self):
        """Publish batches until the outbox is empty (or ``stop``)."""
        published = 0
        try:
            while not self._stop.is_set():
                broker = self.get_broker()
                failure = None
                with self.source.batch(self.batch_size) as rows:
                    if not rows:
                        return
                    done = []
                    for row in rows:
                        try:
                            with metrics.publishing():  # counted like send_event's publishes
                                broker.publish(row.channel, row.event_type, row.data, idempotency_key=row.key)
                        except BrokerUnavailable as error:
                            failure = error
                            break
                        except InvalidEvent as error:
                            log.error(
                                "outbox relay (%s): the broker refuses outbox row %d (%r on %r) for good: %s; "
                                "dropping it",
                                self.source.alias,
                                row.id,
                                row.event_type,
                                row.channel,
                                error,
                            )
                        done.append(row.id)
                    if done:
                        self.source.delete(done)
                published += len(done)
                self.published += len(done)
                if failure is not None:
                    self._broker_down = True
                    raise failure
                if len(rows) < self.batch_size:
                    return
        finally:
            if published:
                # The PostgreSQL broker publishes on Django's connection of this
                # thread: hand a pooled one back instead of keeping it checked out.
                _release_django_connections()

    def _down(self, kind, error):
        if kind not in self._outages:
            self._outages[kind] = time.monotonic()
            log.warning(
                "outbox relay (%s): %s unavailable (%s); events wait in the outbox, retrying",
                self.source.alias,
                kind,
                error,
            )
        else:
            log.debug("outbox relay (%s): %s still unavailable (%s)", self.source.alias, kind, error)
        if kind == "database":
            self.active = False
            self._role = None  # say again which one it is once reconnected
            self.source.disconnect()

    def _up(self, kind):
        started = self._outages.pop(kind, None)
        if started is not None:
            log.warning(
                "outbox relay (%s): %s back after %.1f s; publishing the outbox",
                self.source.alias,
                kind,
                time.monotonic() - started,
            )


def _release_django_connections():
    """Close the Django connections this thread opened (the broker's); the thread keeps none checked out."""
    for connection in connections.all(initialized_only=True):
        connection.close()
