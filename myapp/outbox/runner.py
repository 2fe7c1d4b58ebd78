"""Where relays run: next to each gunicorn worker's hub, or in ``manage.py push_relay``.

``start_in_worker()`` (called by ``myapp.gunicorn.post_worker_init``, after
gevent patched the worker) starts one relay per database of
MYAPP_OUTBOX_DATABASES in a greenlet of the worker, when the app
``myapp.outbox`` is installed and MYAPP_OUTBOX_RELAY_IN_WORKERS is on.
Every worker of every host runs them; per database one is active at a time
(``myapp.outbox.sources``), the others stand by and take over when it ends. Their
waits are cooperative (gevent watchers on the PostgreSQL connection, psycopg
with ``PSYCOPG_WAIT_FUNC=wait_poll``; SQLite never waits for its lock), so a
relay never blocks the worker's streams.

``start()`` is the same for any process: ``manage.py push_relay`` runs it in
the foreground, in threads.

This module imports nothing of the app at import time, so
``myapp.gunicorn`` can call it whether or not the app is installed.
"""

import threading

from django.apps import apps

from myapp.conf import setting
from myapp.registry import ProcessLocal

from . import APP

__all__ = ["Relays", "start", "start_in_worker"]


class Relays:
    """Running relays, one per database, each in its own thread (a greenlet under gevent)."""

    def __init__(self, relays):
        self.relays = relays
        self.threads = []
        for relay in relays:
            thread = threading.Thread(target=relay.run, name=f"myapp-outbox-{relay.source.alias}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout=10.0):
        """Stop every relay and wait up to ``timeout`` seconds for each to finish its batch."""
        for relay in self.relays:
            relay.stop()
        for thread in self.threads:
            thread.join(timeout)

    def alive(self):
        """True while any relay thread runs."""
        return any(thread.is_alive() for thread in self.threads)


def start(aliases=None, **options):
    """Start a relay for each database alias and return the ``Relays``.

    aliases: list of aliases, default MYAPP_OUTBOX_DATABASES.
    options: ``Relay`` keywords (``poll_seconds`` defaults to
        MYAPP_OUTBOX_POLL_SECONDS, ``get_broker`` to the process's broker).

    Raise ImproperlyConfigured if the app is not installed, or an alias is
    unknown or of a vendor without a relay.
    """
    from django.core.exceptions import ImproperlyConfigured

    if not apps.is_installed(APP):
        raise ImproperlyConfigured(f'The outbox relay needs the app "{APP}" in INSTALLED_APPS')
    from myapp.brokers import get_broker

    from .relay import Relay
    from .sources import source_for

    options.setdefault("poll_seconds", float(setting("MYAPP_OUTBOX_POLL_SECONDS")))
    options.setdefault("get_broker", get_broker)
    aliases = list(setting("MYAPP_OUTBOX_DATABASES") if aliases is None else aliases)
    sources = [source_for(alias) for alias in aliases]
    return Relays([Relay(source, **options) for source in sources])


def _build():
    return start()


_worker_relays = ProcessLocal(_build, discard=lambda relays: relays.stop())


def start_in_worker():
    """Start this process's relays once, if the app is installed and MYAPP_OUTBOX_RELAY_IN_WORKERS is on.

    Return the ``Relays``, or None when there are none to run.
    """
    if not apps.is_installed(APP) or not setting("MYAPP_OUTBOX_RELAY_IN_WORKERS"):
        return None
    return _worker_relays.get()
