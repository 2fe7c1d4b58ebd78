"""gunicorn server hooks for the push service: one import in a host's ``gunicorn.conf.py``.

A host's whole configuration::

    # gunicorn.conf.py
    from myapp.gunicorn import *  # noqa: F403 - the push service's worker hooks
    worker_class = "gevent"

Importing this module (gunicorn loads the config file in its arbiter, before
any worker forks) imports no Django and does two things for every process
that follows:

- sets ``PSYCOPG_WAIT_FUNC=wait_poll`` unless already set: psycopg picks its
  wait function at import, and one imported before gevent patches ``select``
  would block a whole worker; ``wait_poll`` looks ``select.poll`` up at call
  time, so it is cooperative whatever the import order;
- raises the soft file-descriptor limit (``ulimit -n``) to the hard one:
  every stream holds a socket.

and exports the worker hook ``post_worker_init`` (see its docstring). A host
with a ``post_worker_init`` of its own calls ours from it.
"""

import os
import resource
import signal

__all__ = ["post_worker_init"]
# A later `child_exit(server, worker)` hook (e.g. metrics: prometheus-client's
# multiprocess.mark_process_dead(worker.pid)) belongs here and in __all__.

os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_poll")


def _raise_open_files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_open_files_limit()


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
    from myapp import gcwatch
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
    # What is alive now lives as long as the worker: keep it out of every
    # full collection, and time the collections that remain (/healthz).
    gcwatch.install()
    gcwatch.freeze()

    original = worker.handle_exit

    def handle_exit(sig, frame):
        original(sig, frame)  # stop accepting; gunicorn then waits for open requests

        def close_streams():
            from myapp import hub

            hub.shutdown()

        # Not inside the signal handler: it may have interrupted code holding
        # the hub's lock.
        gevent.spawn(close_streams)

    signal.signal(signal.SIGTERM, handle_exit)
