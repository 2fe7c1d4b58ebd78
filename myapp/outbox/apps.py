from django.apps import AppConfig


class OutboxConfig(AppConfig):
    """Durable publishing: the outbox table (``myapp_outbox_event``) and its relay.

    Add ``"myapp.outbox"`` to INSTALLED_APPS (and run ``migrate``) to publish
    with ``send_event(..., durable=True)`` or ``MYAPP_DURABLE_PUBLISH = True``;
    the system check myapp.E013 names this app when durable publishing is
    asked for without it.
    """

    name = "myapp.outbox"
    label = "myapp_outbox"
    verbose_name = "Push service: outbox"
    # Fixed here, so a host's DEFAULT_AUTO_FIELD never asks for a new migration.
    default_auto_field = "django.db.models.BigAutoField"
