"""A Celery app for the tests only: the Redis transport on the embedded Valkey, a task that publishes.

Run as a real worker by tests/test_celery.py::

    celery -A tests.celery_app worker --pool prefork --concurrency 2 --max-tasks-per-child 1

Environment: CELERY_BROKER_URL (kombu URL of the Valkey server),
DJANGO_SETTINGS_MODULE (Celery's Django fix-up sets Django up in the parent
and closes inherited database connections in each child), and
CELERY_READY_CHANNEL: a channel the parent publishes ``celery.ready`` to once
its pool is up, so every child forked after it (each recycled one) comes from
a process that has used the push broker's connections.
"""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("tests")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
)


@app.task
def notify(channel, n):
    """Publish ``celery.task`` ``{"n": n, "pid": <this process>}`` on ``channel``; return the event id."""
    from myapp.publish import send_event

    return send_event(channel, "celery.task", {"n": n, "pid": os.getpid()})


@signals.worker_ready.connect
def announce(**kwargs):
    """In the worker's parent process, once the pool runs: publish ``celery.ready`` with the parent's pid."""
    channel = os.environ.get("CELERY_READY_CHANNEL")
    if channel:
        from myapp.publish import send_event

        send_event(channel, "celery.ready", {"pid": os.getpid()})
