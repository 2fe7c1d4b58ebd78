"""gunicorn settings for the push service: gevent workers holding SSE streams.

Run: ``gunicorn -c gunicorn.conf.py config.wsgi`` (the README's run command does).
Environment overrides: GUNICORN_BIND, WEB_CONCURRENCY, GUNICORN_WORKER_CONNECTIONS,
GUNICORN_GRACEFUL_TIMEOUT, GUNICORN_ACCESS_LOG, GUNICORN_LOG_LEVEL.
See docs/deployment.md for sizing.
"""

import os

# The push service's worker hooks (post_worker_init: config checks with the
# real worker count, SIGTERM ends streams at once), PSYCOPG_WAIT_FUNC=wait_poll
# and the raised file-descriptor limit. Everything below is this project's
# own choice of gunicorn settings.
from myapp.gunicorn import *  # noqa: F403

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
# it: on SIGTERM every stream ends at once (myapp.gunicorn) and the
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
