"""Durable publishing: a transactional outbox and the relay that empties it.

``send_event(..., durable=True)`` (or every ``send_event`` with
``MYAPP_DURABLE_PUBLISH = True``) does not talk to the broker: it validates
the event and inserts it into ``myapp_outbox_event`` on the caller's
database, inside the caller's transaction when there is one (``store.py``).
The event therefore exists exactly when the caller's data was committed: a
broker outage or a publisher that dies right after COMMIT delays it, never
loses it, and a rollback publishes nothing.

A relay (``relay.py``) publishes the rows to the broker in ``id`` order, each
with its idempotency key (the publisher's id, else a generated one), and
deletes them; while the broker is down it retries with jittered exponential
backoff. It runs next to each gunicorn worker's hub (``runner.py``, started
by ``myapp.gunicorn.post_worker_init``) and as ``manage.py push_relay``.

One relay at a time is active per database (``myapp.outbox.sources``): on PostgreSQL
the one holding a session-level advisory lock, woken by NOTIFY; on SQLite
the one holding a flock on a file next to the database, polling. See
docs/outbox.md.

This package is an app of its own (label ``myapp_outbox``): only projects that
publish durably install it and get its table.
"""

#: The app to add to INSTALLED_APPS for durable publishing.
APP = "myapp.outbox"

#: The NOTIFY channel a durable publish signals on PostgreSQL (at COMMIT).
NOTIFY_CHANNEL = "myapp_outbox"
