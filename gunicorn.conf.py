"""gunicorn settings for the push service: gevent workers holding SSE streams.

Run: ``gunicorn -c gunicorn.conf.py config.wsgi`` (the README's run command does).
Environment overrides: GUNICORN_BIND, WEB_CONCURRENCY, GUNICORN_WORKER_CONNECTIONS,
GUNICORN_GRACEFUL_TIMEOUT, GUNICORN_ACCESS_LOG, GUNICORN_LOG_LEVEL.
See docs/deployment.md for sizing.
"""

import os
import resource
import signal

# psycopg picks its wait function when first imported; if anything imports
# it before gevent patches `select`, its C wait would block a whole worker.
# wait_poll looks `select.poll` up at call time, so it is cooperative either
# way (tests/test_gevent_cooperation.py checks it).
os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_poll")

# Address to listen on: "host:port" or "unix:/path". Loopback by default; put a
# reverse proxy (with buffering off for /events/) in front in production.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")

# Worker processes. Each holds thousands of streams, so about one per CPU
# core; each has one broker subscription and one hub greenlet.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))

# gevent: one greenlet per connection, so an idle stream costs kilobytes of
# memory instead of a thread.
worker_class = "gevent"

# Connections (streams AND ordinary requests) one worker serves at once; at
# the cap, further requests wait in the accept queue and seem to hang. Size it
# for the streams you expect per worker plus headroom for page and API calls.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "12000"))

# Connections (a count, not seconds) the kernel queues on the listen socket
# until a worker accepts them (the listen backlog); past it, Linux drops new
# connection attempts and clients retry them. Capped by net.core.somaxconn.
backlog = 4096

# Seconds without a heartbeat from a worker before the arbiter kills it. Under
# gevent the worker notifies from its own loop, so long-lived streams are fine.
timeout = 30

# Seconds a stopping worker waits for open requests. Streams do not wait for
# it: on SIGTERM every stream ends at once (see post_worker_init) and the
# browsers resume on another worker, so this only bounds ordinary requests.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "10"))

# Seconds an idle HTTP keep-alive connection stays open between requests.
keepalive = 5

# The app must be imported inside each worker, after gevent has patched it.
preload_app = False

# gunicorn 27 opens a control socket under $HOME by default; not wanted here.
control_socket_disable = True

# Access log to stdout ("-") or a path; error log to stderr; log level
# (debug, info, warning, error, critical).
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# Streams need one file descriptor each: raise the soft limit to the hard one.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def post_worker_init(worker):
    """Check the configuration, then end streams at once on SIGTERM (graceful stop)."""
    import gevent
    from django.core import checks

    from myapp import checks as myapp_checks

    # The real worker count (-w, WEB_CONCURRENCY or `workers` above), for the
    # memory-broker check: the environment alone misses `-w N`.
    myapp_checks.server_workers = worker.cfg.workers
    problems = [message for message in checks.run_checks(tags=["myapp"]) if message.is_serious()]
    for message in problems:
        worker.log.error("%s", message)
    if problems:
        raise SystemExit(3)  # gunicorn's WORKER_BOOT_ERROR: the arbiter stops instead of looping

    from gunicorn.workers.base_async import ALREADY_HANDLED, AsyncWorker

    from myapp.adoption import adopting

    if isinstance(worker, AsyncWorker):
        worker.wsgi = adopting(worker.wsgi, ALREADY_HANDLED)

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
