"""The real service in subprocesses for end-to-end tests: gunicorn (gevent) + db_worker."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import requests

from tests.sse_client import login

BASE = Path(__file__).resolve().parent.parent
PASSWORD = "correct-horse-battery"
PUBLISH_TOKEN = "test-publish-token-0123456789abcdef"
USERS = ("alice", "bob", "carol")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveStack:
    """gunicorn with gevent workers and the task worker, on a free port.

    mode: "redis" (Redis broker + SQLite) or "postgres" (PostgreSQL for
    everything, in a database of its own on ``postgres``; with
    ``MYAPP_BROKER_DATABASE_URL`` in ``env`` the broker uses that server instead).
    """

    def __init__(self, directory, *, mode, redis_url=None, postgres=None, workers=2, heartbeat=1.0, env=None):
        self.directory = Path(directory)
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "REDIS_URL", "MYAPP_BROKER_BACKEND", "WEB_CONCURRENCY")
        }
        self.env.update(
            {
                # The demo's real settings (pytest's tests.settings add the PostgreSQL broker's app).
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "MYAPP_VAR_DIR": str(self.directory),
                "DJANGO_SECRET_KEY": "live-stack-" + uuid.uuid4().hex,
                "GUNICORN_BIND": f"127.0.0.1:{self.port}",
                "WEB_CONCURRENCY": str(workers),
                "GUNICORN_GRACEFUL_TIMEOUT": "10",
                "IMPORT_STEP_SECONDS": "0.05",
                "MYAPP_HEARTBEAT_SECONDS": str(heartbeat),
                "MYAPP_PUBLISH_TOKENS": PUBLISH_TOKEN,
                "MYAPP_BROKER_BACKEND": mode,
                # Small enough for the slow-client tests to overflow quickly.
                "MYAPP_STREAM_QUEUE_SIZE": "100",
                "MYAPP_SEND_TIMEOUT_SECONDS": "3",
                "MYAPP_RETRY_MILLISECONDS": "300",
                # Room for 64 KiB payloads plus their JSON envelope.
                "MYAPP_PUBLISH_MAX_BODY_BYTES": "1048576",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if mode == "redis":
            self.env["REDIS_URL"] = redis_url
            self.env["DATABASE_URL"] = f"sqlite:///{self.directory / 'db.sqlite3'}"
        else:
            import psycopg

            dbname = "stack_" + uuid.uuid4().hex[:10]
            with psycopg.connect(postgres.url("postgres"), autocommit=True) as connection:
                connection.execute(f'CREATE DATABASE "{dbname}"')
            self.env["DATABASE_URL"] = postgres.url(dbname)
        self.env.update(env or {})
        self.gunicorn = None
        self.worker = None
        self.log = self.directory / "stack.log"

    def manage(self, *args, check=True):
        """Run ``manage.py args`` with the stack's environment; return the CompletedProcess."""
        return subprocess.run(
            [sys.executable, str(BASE / "manage.py"), *args],
            env=self.env,
            cwd=BASE,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def migrate(self):
        """Create the tables: Django's database, and the broker's own server when it has one."""
        self.manage("migrate", "--noinput", "-v", "0")
        if self.env.get("MYAPP_BROKER_DATABASE_URL"):
            self.manage("migrate", "--noinput", "-v", "0", "--database", "broker")

    def __enter__(self):
        self.migrate()
        for user in USERS:
            self.manage("demo_user", "--username", user, "--password", PASSWORD)
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in __exit__
        self.start_gunicorn()
        self.start_worker()
        return self

    def start_gunicorn(self):
        self.gunicorn = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "config.wsgi"],
            env=self.env,
            cwd=BASE,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def start_worker(self):
        self.worker = subprocess.Popen(
            [
                sys.executable,
                str(BASE / "manage.py"),
                "db_worker",
                "--interval",
                "0.05",
                "--no-reload",
                "--no-startup-delay",
            ],
            env=self.env,
            cwd=BASE,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gunicorn.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.gunicorn.returncode}: {self.tail()}")
            try:
                requests.get(self.url + "/accounts/login/", timeout=1)
                if len(self.worker_pids()) >= int(self.env["WEB_CONCURRENCY"]):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the stack did not answer within {timeout} s: {self.tail()}")

    def worker_pids(self):
        """The gunicorn worker processes' pids."""
        try:
            return [child.pid for child in psutil.Process(self.gunicorn.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def serving_worker(self, client):
        """The pid of the worker holding ``client``'s connection (an SSEClient)."""
        for pid in self.worker_pids():
            for connection in psutil.Process(pid).net_connections(kind="tcp"):
                if connection.raddr and connection.raddr.port == client.local_port:
                    return pid
        raise AssertionError(f"no worker holds the connection from port {client.local_port}")

    def publish(self, channel, data, event_type="note", **fields):
        """Publish through the HTTP API; return the response."""
        return requests.post(
            self.url + "/api/events/",
            json={"channel": channel, "event_type": event_type, "data": data, **fields},
            headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )

    def start_job(self, session, source):
        """Start an import job over HTTP (CSRF header from the session's cookie); return its JSON."""
        response = session.post(
            self.url + "/jobs/", data={"source": source}, headers={"X-CSRFToken": session.cookies["csrftoken"]}
        )
        assert response.status_code == 201, response.text
        return response.json()

    def tail(self, size=4000):
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def login(self, user="alice"):
        return login(self.url, user, PASSWORD)

    def stop_process(self, process, sig=signal.SIGTERM, timeout=20):
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __exit__(self, *exc_info):
        self.stop_process(self.worker)
        self.stop_process(self.gunicorn)
        self._log_file.close()
