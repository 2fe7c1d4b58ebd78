"""Tables of the PostgreSQL broker (created on every database, used only by that backend).

The broker reads and writes them with its own SQL (``myapp.brokers.postgres``),
never through the ORM on the hot path; the models exist for migrations.
"""

from django.db import models


class BrokerEvent(models.Model):
    """One event in a channel's history (bounded by length and age)."""

    channel = models.TextField()
    pos = models.BigIntegerField(help_text="broker position: ms << 22 | seq (see myapp.ids)")
    prev = models.BigIntegerField(help_text="the channel's previous position, 0 for the first")
    event_type = models.TextField()
    data = models.TextField()
    key = models.TextField(null=True, help_text="publisher-chosen id, for idempotent publishing")

    class Meta:
        db_table = "myapp_broker_event"
        constraints = [models.UniqueConstraint(fields=["channel", "pos"], name="myapp_broker_event_channel_pos")]
        indexes = [
            models.Index(fields=["pos"], name="myapp_broker_event_pos"),
            models.Index(
                fields=["channel", "key"], name="myapp_broker_event_key", condition=models.Q(key__isnull=False)
            ),
        ]


class BrokerState(models.Model):
    """One row (id 1) holding the newest position handed out; its row lock orders publishers."""

    id = models.PositiveSmallIntegerField(primary_key=True)
    pos = models.BigIntegerField()

    class Meta:
        db_table = "myapp_broker_state"
