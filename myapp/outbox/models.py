"""The outbox table, in the ``myapp_outbox`` app.

``send_event(..., durable=True)`` inserts rows with the ORM (``store.py``);
the relay reads, publishes and deletes them with its own SQL on a connection
of its own (``myapp.outbox.sources``).
"""

from django.db import models
from django.utils import timezone


class OutboxEvent(models.Model):
    """One event written by a durable publish, waiting for the relay.

    Rows are published in ``id`` order and deleted once the broker took them.
    """

    channel = models.TextField()
    event_type = models.TextField()
    # bytea / BLOB, not text: the UTF-8 bytes of the wire data, which may hold
    # NUL (PostgreSQL text cannot).
    data = models.BinaryField(help_text="the event data as sent on the wire, UTF-8")
    idempotency_key = models.TextField(
        help_text="the publisher's id, else a generated one: a relay that publishes the row twice delivers it once"
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "myapp_outbox_event"
