"""The PostgreSQL broker's tables, in the ``myapp_postgres`` app.

The broker reads and writes them with its own SQL (``sql.py``), never through
the ORM; the models exist for migrations.
"""

from django.db import models


class BrokerEvent(models.Model):
    """One event in a channel's history (bounded by length and age)."""

    channel = models.TextField()
    pos = models.BigIntegerField(help_text="broker position: ms << 22 | seq (see myapp.ids)")
    prev = models.BigIntegerField(help_text="the channel's previous position, 0 for the first")
    event_type = models.TextField()
    # bytea, not text: the UTF-8 bytes of the data, which may contain NUL
    # (PostgreSQL text cannot).
    data = models.BinaryField(help_text="the event data, UTF-8")
    key = models.TextField(null=True, help_text="publisher-chosen id, for idempotent publishing")

    class Meta:
        db_table = "myapp_postgres_event"
        constraints = [models.UniqueConstraint(fields=["channel", "pos"], name="myapp_postgres_event_channel_pos")]
        indexes = [
            models.Index(fields=["pos"], name="myapp_postgres_event_pos"),
            models.Index(
                fields=["channel", "key"], name="myapp_postgres_event_key", condition=models.Q(key__isnull=False)
            ),
        ]


class BrokerState(models.Model):
    """One row (id 1) holding the newest position handed out; its row lock orders publishers."""

    id = models.PositiveSmallIntegerField(primary_key=True)
    pos = models.BigIntegerField()

    class Meta:
        db_table = "myapp_postgres_state"


class PresenceEntry(models.Model):
    """What one hub holds under a presence key (``myapp.presence``): a member and its count."""

    key = models.TextField()
    hub = models.TextField()
    member = models.TextField()
    count = models.IntegerField()

    class Meta:
        db_table = "myapp_postgres_presence"
        constraints = [
            models.UniqueConstraint(fields=["key", "hub", "member"], name="myapp_postgres_presence_key_hub_member")
        ]


class PresenceHub(models.Model):
    """A hub that counts as alive until ``expires`` (ms since the epoch, the server's clock)."""

    hub = models.TextField(primary_key=True)
    expires = models.BigIntegerField()

    class Meta:
        db_table = "myapp_postgres_hub"
