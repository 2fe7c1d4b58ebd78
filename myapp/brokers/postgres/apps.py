from django.apps import AppConfig


class PostgresBrokerConfig(AppConfig):
    """The PostgreSQL broker's tables (``myapp_postgres_event``, ``myapp_postgres_state``).

    Add ``"myapp.brokers.postgres"`` to INSTALLED_APPS only with
    ``MYAPP_BROKER = {"BACKEND": "myapp.brokers.postgres.PostgresBroker"}``;
    other brokers need no table. The system check myapp.E009 names this app
    when the broker is configured without it.
    """

    name = "myapp.brokers.postgres"
    label = "myapp_postgres"
    verbose_name = "Push service: PostgreSQL broker"
    # Fixed here, so a host's DEFAULT_AUTO_FIELD never asks for a new migration.
    default_auto_field = "django.db.models.BigAutoField"
