"""The service under test, in its own processes: broker server, migrated database, gunicorn.

``Stack`` starts an embedded Valkey (Redis backend and baseline) or an
embedded PostgreSQL (PostgreSQL backend) from ``scripts.servers``, runs
``manage.py migrate``, then gunicorn with the project's ``gunicorn.conf.py``
(gevent workers) on a free loopback port, as tests/stack.py does. Its
``env`` is also what the benchmark process needs before ``django.setup()``
(same SECRET_KEY for tokens, same broker).

Measurements read the processes with psutil: worker CPU seconds (user +
system), worker RSS bytes, open file descriptors per worker, and the broker
server's CPU seconds.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from scripts.servers import EmbeddedPostgres, EmbeddedValkey

__all__ = ["Stack", "BASE"]

BASE = Path(__file__).resolve().parent.parent
SECRET_KEY = "bench-secret-key-not-for-production-0123456789abcdef"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Broker server + gunicorn for one benchmark target.

    directory: a scratch folder (servers, SQLite, logs).
    backend: "redis" or "postgres" (MYAPP_BROKER_BACKEND).
    settings: DJANGO_SETTINGS_MODULE for gunicorn and the benchmark process.
    workers: gunicorn workers (WEB_CONCURRENCY).
    worker_connections: GUNICORN_WORKER_CONNECTIONS (streams + requests per worker).
    heartbeat: MYAPP_HEARTBEAT_SECONDS (seconds), or None for the default (15).
    env: more environment for gunicorn only (dict), or None.
    """

    def __init__(
        self,
        directory,
        *,
        backend,
        settings="bench.settings",
        workers=2,
        worker_connections=20000,
        heartbeat=None,
        env=None,
    ):
        self.directory = Path(directory)
        self.backend = backend
        self.settings = settings
        self.workers = workers
        self.worker_connections = worker_connections
        self.heartbeat = heartbeat
        self.port = free_port()
        self.host = "127.0.0.1"
        self.valkey = None
        self.postgres = None
        self.gunicorn = None
        self.log_path = self.directory / "gunicorn.log"
        self.env = {}
        self._extra_env = dict(env or {})

    # -- lifecycle ---------------------------------------------------------------

    def start(self):
        """Start the broker server, migrate, start gunicorn and wait for every worker. Return self."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("MYAPP_", "GUNICORN_", "DJANGO_"))
            and key not in ("DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY")
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": self.settings,
                "DJANGO_SECRET_KEY": SECRET_KEY,
                "MYAPP_VAR_DIR": str(self.directory / "var"),
                "MYAPP_BROKER_BACKEND": self.backend,
                "GUNICORN_BIND": f"{self.host}:{self.port}",
                "WEB_CONCURRENCY": str(self.workers),
                "GUNICORN_WORKER_CONNECTIONS": str(self.worker_connections),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.heartbeat is not None:
            env["MYAPP_HEARTBEAT_SECONDS"] = str(self.heartbeat)
        if self.backend == "redis":
            self.valkey = EmbeddedValkey(self.directory / "valkey", maxclients=20000).start()
            env["REDIS_URL"] = self.valkey.url
            env["DATABASE_URL"] = f"sqlite:///{self.directory / 'db.sqlite3'}"
        else:
            import psycopg

            self.postgres = EmbeddedPostgres(self.directory / "postgres", max_connections=300).start()
            with psycopg.connect(self.postgres.url("postgres"), autocommit=True) as connection:
                connection.execute('CREATE DATABASE "bench"')
            env["DATABASE_URL"] = self.postgres.url("bench")
        self.env = env
        subprocess.run(
            [sys.executable, str(BASE / "manage.py"), "migrate", "--noinput", "-v", "0"],
            env=env,
            cwd=BASE,
            check=True,
            timeout=300,
        )
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.gunicorn = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "config.wsgi"],
            env={**env, **self._extra_env},
            cwd=BASE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gunicorn.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.gunicorn.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    ready = response.status == 200
            except OSError:
                ready = False
            if ready and len(self.workers_processes()) >= self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within {timeout} s: {self.log_tail()}")

    def stop(self):
        """Stop gunicorn (SIGTERM, then SIGKILL) and the broker server."""
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.terminate()
            try:
                self.gunicorn.wait(30)
            except subprocess.TimeoutExpired:
                self.gunicorn.kill()
                self.gunicorn.wait()
        if self.gunicorn is not None:
            self._log.close()
        if self.valkey is not None:
            self.valkey.stop()
        if self.postgres is not None:
            self.postgres.stop("immediate")

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    # -- measurements ----------------------------------------------------------

    def workers_processes(self):
        """The gunicorn worker processes (psutil.Process list)."""
        try:
            return psutil.Process(self.gunicorn.pid).children()
        except psutil.NoSuchProcess:
            return []

    def worker_cpu_seconds(self):
        """CPU seconds (user + system) used so far by all gunicorn workers (float)."""
        return sum(_cpu(process) for process in self.workers_processes())

    def worker_rss_bytes(self):
        """Resident memory of all gunicorn workers (bytes, int)."""
        return sum(_safe(lambda p=process: p.memory_info().rss) for process in self.workers_processes())

    def worker_fds(self):
        """Open file descriptors per worker (list of int)."""
        return [_safe(process.num_fds) for process in self.workers_processes()]

    def worker_clients(self):
        """Client sockets each worker holds open (list of int): its streams and requests in flight.

        Counted from the worker's file descriptors (sockets that are neither
        unix sockets nor the listening socket), so a connection the client
        already reset still counts until the worker closes it.
        """
        counts = []
        for process in self.workers_processes():
            try:
                other = {c.fd for c in process.net_connections(kind="unix")}
                other |= {c.fd for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
                sockets = 0
                for fd in os.listdir(f"/proc/{process.pid}/fd"):
                    try:
                        if os.readlink(f"/proc/{process.pid}/fd/{fd}").startswith("socket:") and int(fd) not in other:
                            sockets += 1
                    except OSError:
                        pass
            except (OSError, psutil.Error):
                sockets = 0
            counts.append(sockets)
        return counts

    def broker_cpu_seconds(self):
        """CPU seconds used so far by the broker server (Valkey, or PostgreSQL and its backends)."""
        if self.valkey is not None:
            return _cpu(psutil.Process(self.valkey.process.pid))
        pid_file = self.postgres.pgdata / "postmaster.pid"
        try:
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            times = postmaster.cpu_times()
        except (OSError, ValueError, psutil.Error):
            return 0.0
        own = times.user + times.system + times.children_user + times.children_system
        return own + sum(_cpu(child) for child in postmaster.children(recursive=True))

    def broker_connections(self):
        """Client connections the broker server holds now (int; Valkey INFO or pg_stat_activity)."""
        if self.valkey is not None:
            import redis

            try:
                return redis.Redis.from_url(self.valkey.url).info("clients")["connected_clients"] - 1
            except (redis.RedisError, OSError):
                return None
        import psycopg

        try:
            with psycopg.connect(self.postgres.url("postgres"), autocommit=True) as connection:
                row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                return row.fetchone()[0] - 1
        except psycopg.Error:
            return None

    def log_tail(self, size=4000):
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def log_issues(self, limit=8):
        """Summarise gunicorn's log: warning/error lines and the exceptions in tracebacks.

        Return {"count": int (log lines at WARNING or above), "kinds": {what:
        count}, "first": [the first ``limit`` such lines]}. ``what`` is an
        exception class (from a traceback's last line) or a log message
        with numbers and pids blanked out.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {"count": 0, "first": [], "kinds": {}}
        logged = re.compile(r"(?:\[(?:WARNING|ERROR|CRITICAL)\]| (?:WARNING|ERROR|CRITICAL) )(.*)")
        exception = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout)):")
        kinds = {}
        first = []
        count = 0
        for line in text.splitlines():
            match = logged.search(line)
            if match:
                count += 1
                if len(first) < limit:
                    first.append(line[:300])
                key = re.sub(r"\[\d+\]|\d+", "#", match.group(1).strip())[:100]
            else:
                match = exception.match(line)
                if not match:
                    continue
                key = match.group(1)
            kinds[key] = kinds.get(key, 0) + 1
        return {"count": count, "first": first, "kinds": kinds}


def _cpu(process):
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _safe(call):
    try:
        return call()
    except psutil.Error:
        return 0
