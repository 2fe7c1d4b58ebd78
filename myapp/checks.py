"""System checks (``manage.py check``; run by each gunicorn worker at boot)."""

import os

from django.apps import apps
from django.core import checks
from django.db import connections

from myapp.auth import get_authorizer
from myapp.brokers import load_broker
from myapp.conf import setting
from myapp.exceptions import BrokerConfigurationError

TAG = "myapp"

#: Worker processes of the gunicorn server this process runs in (int), or None
#: outside gunicorn. myapp.gunicorn.post_worker_init sets it from
#: ``worker.cfg.workers`` (the count gunicorn really started: ``-w``/``--workers``,
#: WEB_CONCURRENCY or the config file's default) before it runs these checks.
#: When it is None, check_broker reads WEB_CONCURRENCY, and without it assumes
#: one process (``runserver``, ``manage.py`` commands).
server_workers = None


def _worker_count():
    """Return (worker processes, where the number came from) for the memory-broker check.

    The number is None when WEB_CONCURRENCY is not a number (gunicorn refuses
    to start then anyway).
    """
    if server_workers is not None:
        return server_workers, f"gunicorn runs {server_workers} workers"
    workers = os.environ.get("WEB_CONCURRENCY", "1")
    return (int(workers) if workers.isdigit() else None), f"WEB_CONCURRENCY={workers} starts several gunicorn workers"


@checks.register(TAG)
def check_broker(app_configs=None, **kwargs):
    errors = []
    try:
        broker = load_broker(setting("MYAPP_BROKER"))
    except BrokerConfigurationError as error:
        return [checks.Error(str(error), id="myapp.E001")]
    workers, source = _worker_count()
    if not broker.supports_multiple_processes and workers is not None and workers > 1:
        errors.append(
            checks.Error(
                f"{type(broker).__name__} keeps events inside one process, but {source}: "
                "most streams would miss most events.",
                hint="Use myapp.brokers.redis.RedisBroker or myapp.brokers.postgres.PostgresBroker, "
                "or run one worker (gunicorn -w 1, or WEB_CONCURRENCY=1).",
                id="myapp.E002",
            )
        )
    errors.extend(broker.check())
    return errors


@checks.register(TAG)
def check_settings(app_configs=None, **kwargs):
    errors = []
    try:
        get_authorizer()
    except BrokerConfigurationError as error:
        errors.append(checks.Error(str(error), id="myapp.E005"))
    heartbeat = setting("MYAPP_HEARTBEAT_SECONDS")
    if not isinstance(heartbeat, (int, float)) or heartbeat <= 0:
        errors.append(checks.Error("MYAPP_HEARTBEAT_SECONDS must be a number of seconds > 0.", id="myapp.E006"))
    elif heartbeat > 40:
        errors.append(
            checks.Warning(
                f"MYAPP_HEARTBEAT_SECONDS={heartbeat}: EventSource polyfills drop a stream after 45 s of silence.",
                id="myapp.W001",
            )
        )
    tokens = setting("MYAPP_PUBLISH_TOKENS")
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) and t for t in tokens):
        errors.append(checks.Error("MYAPP_PUBLISH_TOKENS must be a list of non-empty str.", id="myapp.E007"))
    elif any(len(t) < 16 for t in tokens):
        errors.append(checks.Warning("A MYAPP_PUBLISH_TOKENS entry is shorter than 16 characters.", id="myapp.W002"))
    origins = setting("MYAPP_CORS_ALLOWED_ORIGINS")
    if "*" in origins:
        errors.append(
            checks.Error(
                "MYAPP_CORS_ALLOWED_ORIGINS may not contain '*': streams carry credentials.",
                hint="List each origin, e.g. 'https://app.example.com'.",
                id="myapp.E008",
            )
        )
    return errors


@checks.register(TAG)
def check_metrics(app_configs=None, **kwargs):
    token = setting("MYAPP_METRICS_TOKEN")
    if token is None:
        return []
    if not isinstance(token, str) or not token or token != token.strip():
        return [
            checks.Error(
                "MYAPP_METRICS_TOKEN must be None (metrics off) or a non-empty str without surrounding spaces.",
                id="myapp.E010",
            )
        ]
    errors = []
    if len(token) < 16:
        errors.append(checks.Warning("MYAPP_METRICS_TOKEN is shorter than 16 characters.", id="myapp.W003"))
    try:
        import prometheus_client  # noqa: F401 - only whether it is installed
    except ImportError:
        errors.append(
            checks.Error(
                "MYAPP_METRICS_TOKEN turns metrics on, but prometheus-client is not installed.",
                hint='pip install "myapp-push[metrics]" (or prometheus-client), or unset MYAPP_METRICS_TOKEN.',
                id="myapp.E011",
            )
        )
        return errors
    from myapp.metrics import multiprocess

    if server_workers is not None and server_workers > 1 and not multiprocess():
        errors.append(
            checks.Error(
                f"gunicorn runs {server_workers} workers, but prometheus-client runs in single-process mode: "
                "/metrics would show only the worker that answers each scrape.",
                hint="Start gunicorn.conf.py with 'from myapp.gunicorn import *' (it sets PROMETHEUS_MULTIPROC_DIR "
                "before anything imports prometheus-client), or set PROMETHEUS_MULTIPROC_DIR in the server's "
                "environment.",
                id="myapp.E012",
            )
        )
    return errors


@checks.register(TAG)
def check_outbox(app_configs=None, **kwargs):
    """Durable publishing asked for without the outbox app; outbox settings a relay cannot use."""
    from myapp.outbox import APP

    installed = apps.is_installed(APP)
    if setting("MYAPP_DURABLE_PUBLISH") and not installed:
        return [
            checks.Error(
                f"MYAPP_DURABLE_PUBLISH = True writes every event to the outbox of the app {APP!r}, "
                "which is not in INSTALLED_APPS.",
                hint=f'Add "{APP}" to INSTALLED_APPS, then run "python manage.py migrate".',
                id="myapp.E013",
            )
        ]
    if not installed:
        return []
    from myapp.outbox.sources import SOURCES

    errors = []
    aliases = setting("MYAPP_OUTBOX_DATABASES")
    if not isinstance(aliases, (list, tuple)) or not aliases or not all(isinstance(a, str) for a in aliases):
        errors.append(checks.Error("MYAPP_OUTBOX_DATABASES must be a non-empty list of aliases.", id="myapp.E014"))
        aliases = []
    for alias in aliases:
        if alias not in connections.settings:
            errors.append(
                checks.Error(f"MYAPP_OUTBOX_DATABASES names {alias!r}, which is not in DATABASES.", id="myapp.E014")
            )
        elif connections[alias].vendor not in SOURCES:
            errors.append(
                checks.Error(
                    f"The outbox relay reads PostgreSQL and SQLite databases; DATABASES[{alias!r}] "
                    f"is {connections[alias].vendor}.",
                    hint="Keep the outbox on a PostgreSQL or SQLite alias (MYAPP_OUTBOX_DATABASES).",
                    id="myapp.E015",
                )
            )
    poll = setting("MYAPP_OUTBOX_POLL_SECONDS")
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        errors.append(checks.Error("MYAPP_OUTBOX_POLL_SECONDS must be a number of seconds > 0.", id="myapp.E016"))
    return errors
