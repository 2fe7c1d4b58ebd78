"""Writing durable events: one outbox row per event, in the caller's transaction.

Called by ``myapp.publish.send_event`` once the event is validated; the row
is written with the ORM on the ``using`` alias, so it commits or rolls back
with the caller's own writes. On PostgreSQL the same transaction signals
``NOTIFY myapp_outbox`` (delivered at COMMIT, never on rollback; PostgreSQL
folds identical notifications of one transaction into one), which wakes the
active relay at once.
"""

import uuid

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from myapp.conf import setting

from . import NOTIFY_CHANNEL
from .models import OutboxEvent

__all__ = ["enqueue"]


def enqueue(channel, event_type, text, *, key=None, using=None):
    """Insert one event into the outbox of database ``using`` and return the row's id (int).

    channel, event_type, text: str, already validated by the caller
        (``myapp.publish.validate_event``); text is the wire data.
    key: the publisher's id (str), or None to generate one (a uuid4 hex):
        the relay publishes with it, so a row published again after a relay
        crash is delivered once (within the broker's ``history_ttl``).
    using: the database alias (default ``"default"``); it must be listed in
        MYAPP_OUTBOX_DATABASES, where the relays look.

    Inside ``transaction.atomic(using=...)`` the row belongs to that
    transaction; outside one it is committed before this returns.

    Raise ImproperlyConfigured if ``using`` is not in MYAPP_OUTBOX_DATABASES,
    and Django's DatabaseError (e.g. OperationalError) if the row cannot be
    written: then no event was queued.
    """
    alias = using or DEFAULT_DB_ALIAS
    if alias not in setting("MYAPP_OUTBOX_DATABASES"):
        raise ImproperlyConfigured(
            f"send_event(durable=True, using={alias!r}): no relay reads the outbox of {alias!r}; "
            f"add it to MYAPP_OUTBOX_DATABASES (and run manage.py migrate --database {alias})"
        )
    row = OutboxEvent(
        channel=channel,
        event_type=event_type,
        # encode_data and validate_event guarantee text that encodes to UTF-8.
        data=text.encode("utf-8"),
        idempotency_key=uuid.uuid4().hex if key is None else key,
    )
    connection = connections[alias]
    # savepoint=False: inside the caller's transaction a failure already
    # dooms it; outside one this is the transaction.
    with transaction.atomic(using=alias, savepoint=False):
        row.save(using=alias, force_insert=True)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
    return row.pk
