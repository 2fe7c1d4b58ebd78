"""gunicorn server hooks for the push service: one import in a host's ``gunicorn.conf.py``.

A host's whole configuration::

    # gunicorn.conf.py
    from myapp.gunicorn import *  # noqa: F403 - the push service's worker hooks
    worker_class = "gevent"

Importing this module (gunicorn loads the config file in its arbiter, before
any worker forks) imports no Django and does three things for every process
that follows:

- sets ``PSYCOPG_WAIT_FUNC=wait_poll`` unless already set: psycopg picks its
  wait function at import, and one imported before gevent patches ``select``
  would block a whole worker; ``wait_poll`` looks ``select.poll`` up at call
  time, so it is cooperative whatever the import order;
- raises the soft file-descriptor limit (``ulimit -n``) to the hard one:
  every stream holds a socket;
- sets ``PROMETHEUS_MULTIPROC_DIR`` unless already set, to a new private
  temporary directory: prometheus-client chooses its multiprocess mode when
  it is imported, and every worker must write to the same directory for
  ``/metrics`` to add them up (``myapp.metrics``). With metrics off nothing
  imports prometheus-client and the directory stays empty.

and exports the server hooks ``post_worker_init``, ``on_starting``,
``child_exit`` and ``on_exit`` (see their docstrings). A host with a hook
of the same name calls ours from it.
"""

import os
import resource
import shutil
import signal
import tempfile

__all__ = ["post_worker_init", "on_starting", "child_exit", "on_exit"]

os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_poll")

_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: The metrics directory this module created (removed by ``on_exit``), or
#: None when the environment named one.
_created_dir = None
if not os.environ.get(_MULTIPROC_DIR):
    _created_dir = os.environ[_MULTIPROC_DIR] = tempfile.mkdtemp(prefix="myapp-metrics-")


def _raise_open_files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_open_files_limit()


def on_starting(server):
    """Empty the metrics directory (PROMETHEUS_MULTIPROC_DIR) before the first worker starts.

    Runs in the arbiter. Files of an earlier run would add its counts to
    this run's, and its live gauges would never go away. Only
    prometheus-client's files (``*.db``) are removed; a missing directory is
    created.
    """
    path = os.environ.get(_MULTIPROC_DIR)
    if not path:
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server, worker):
    """Mark an exited worker dead for the metrics: its gauges (open streams, ...) leave the sums.

    Runs in the arbiter (prometheus-client's
    ``multiprocess.mark_process_dead``). What its counters counted stays in
    the totals. Does nothing without prometheus-client.
    """
    path = os.environ.get(_MULTIPROC_DIR)
    if not path:
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid, path)


def on_exit(server):
    """Remove the metrics directory this module created (never one the environment named)."""
    if _created_dir is not None:
        shutil.rmtree(_created_dir, ignore_errors=True)


def post_worker_init(worker):
    """Check the configuration, then make SIGTERM end every stream at once.

    Runs in each worker after Django loaded (gunicorn imports the WSGI app
    first). The ``myapp`` system checks run with the number of workers
    gunicorn really started (``-w``, WEB_CONCURRENCY or ``workers``), so the
    memory broker with several workers stops the server (exit 3, gunicorn's
    WORKER_BOOT_ERROR: the arbiter stops instead of restarting workers in a
    loop). A worker class other than gevent stops it too: streams would hold
    one worker each.

    The worker's WSGI application is wrapped so the hub adopts each stream's
    connection once its response has started (``myapp.adoption``): an idle
    stream then holds no greenlet, request or response. Every object alive
    at that point is frozen out of the garbage collector's full passes, and
    collections are timed (``myapp.gcwatch``, reported by ``/healthz``).

    With metrics on (MYAPP_METRICS_TOKEN), the worker builds its hub at once
    and moves the hub's counters into the metrics every second
    (``myapp.metrics.start``).

    With the app ``myapp.outbox`` installed (and MYAPP_OUTBOX_RELAY_IN_WORKERS
    on), the worker also runs the outbox relay in a greenlet of its own
    (``myapp.outbox.runner``); one worker's relay is active per database.

    On SIGTERM (a deploy, ``kill -TERM``) the worker stops accepting as usual
    and every stream ends at once between two frames, with a jittered
    ``retry``, so browsers resume on another worker instead of waiting for
    ``graceful_timeout``.
    """
    import gevent
    from django.core import checks
    from gunicorn.workers.base_async import ALREADY_HANDLED
    from gunicorn.workers.ggevent import GeventWorker

    from myapp import checks as myapp_checks
    from myapp import gcwatch, metrics
    from myapp.adoption import adopting

    if not isinstance(worker, GeventWorker):
        worker.log.error(
            'myapp: gunicorn runs %s workers; streams need worker_class = "gevent" in gunicorn.conf.py',
            type(worker).__name__,
        )
        raise SystemExit(3)
    myapp_checks.server_workers = worker.cfg.workers
    problems = [message for message in checks.run_checks(tags=[myapp_checks.TAG]) if message.is_serious()]
    for message in problems:
        worker.log.error("%s", message)
    if problems:
        raise SystemExit(3)
    worker.wsgi = adopting(worker.wsgi, ALREADY_HANDLED)
    metrics.start()  # with MYAPP_METRICS_TOKEN set: this worker's hub counters reach /metrics every second
    # What is alive now lives as long as the worker: keep it out of every
    # full collection, and time the collections that remain (/healthz).
    gcwatch.install()
    gcwatch.freeze()
    from myapp.outbox import runner as outbox

    outbox.start_in_worker()  # the outbox relay, when the app myapp.outbox is installed

    original = worker.handle_exit

    def handle_exit(sig, frame):
        original(sig, frame)  # stop accepting; gunicorn then waits for open requests

        def close_streams():
            from myapp import hub

            hub.shutdown()
            metrics.sync()  # the streams just closed count before the worker exits

        # Not inside the signal handler: it may have interrupted code holding
        # the hub's lock.
        gevent.spawn(close_streams)

    signal.signal(signal.SIGTERM, handle_exit)
