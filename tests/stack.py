"""The real service in subprocesses for end-to-end tests: gunicorn (gevent) + db_worker."""

import atexit
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
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
CREATE_USERS = """
from django.contrib.auth import get_user_model
for username in {users!r}:
    user, _ = get_user_model().objects.get_or_create(username=username)
    user.set_password({password!r})
    user.save()
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_database(postgres, template=None):
    """Create a new database on ``postgres`` (an EmbeddedPostgres or the like); return its URL.

    template: a database of that server to copy (``CREATE DATABASE ... TEMPLATE``), or None for an empty one.
    """
    import psycopg

    dbname = "stack_" + uuid.uuid4().hex[:10]
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{dbname}"{copy}')
    return postgres.url(dbname)


#: Prepared databases to copy (migrated, USERS created), one per mode and environment:
#: (mode, server, env items) -> SQLite file path or PostgreSQL database name. A test
#: session migrates once per kind of stack instead of once per stack (two Django
#: starts, ~3 s each time).
_TEMPLATES = {}
_TEMPLATE_DIR = []
#: Environment variables that differ per stack and do not change what migrate creates.
_PER_STACK = {"MYAPP_VAR_DIR", "DJANGO_SECRET_KEY", "GUNICORN_BIND", "DATABASE_URL", "REDIS_URL"}


class LiveStack:
    """gunicorn with gevent workers and the task worker, on a free port.

    mode: "redis" (Redis broker + SQLite) or "postgres" (PostgreSQL for
    everything, in a database of its own on ``postgres``; with
    ``MYAPP_BROKER_DATABASE_URL`` in ``env`` the broker uses that server instead).
    database_url: Django's database instead of the stack's own (SQLite in
        ``directory``, or a new database on ``postgres``): several stacks on
        one database and one broker are hosts of one site.
    secret_key: DJANGO_SECRET_KEY (default: one of the stack's own); hosts of
        one site share it.
    prepare: migrate and create the USERS at start (False: a host joining a
        database another stack prepared).
    task_worker: start ``manage.py db_worker`` beside gunicorn.
    """

    def __init__(
        self,
        directory,
        *,
        mode,
        redis_url=None,
        postgres=None,
        database_url=None,
        secret_key=None,
        prepare=True,
        task_worker=True,
        workers=2,
        heartbeat=1.0,
        env=None,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.prepare = prepare
        self.task_worker = task_worker
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
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
                "DJANGO_SECRET_KEY": secret_key or "live-stack-" + uuid.uuid4().hex,
                "GUNICORN_BIND": self.address,
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
                # Presence (and its join/leave events) only where a test asks for it.
                "MYAPP_PRESENCE_CHANNELS": "room:presence-*",
            }
        )
        self.env.update(env or {})
        self._template_key = None
        self._from_template = False
        if database_url is None and "MYAPP_BROKER_DATABASE_URL" not in self.env:
            settings = sorted(
                (k, v) for k, v in self.env.items() if k.startswith(("MYAPP_", "DJANGO_")) and k not in _PER_STACK
            )
            server = None if postgres is None else (str(getattr(postgres, "directory", "")), postgres.url("postgres"))
            self._template_key = (mode, server, tuple(settings))
        template = _TEMPLATES.get(self._template_key) if prepare else None
        if mode == "redis":
            self.env["REDIS_URL"] = redis_url
            if database_url is None and template is not None:
                shutil.copyfile(template, self.directory / "db.sqlite3")
                self._from_template = True
            self.env["DATABASE_URL"] = database_url or f"sqlite:///{self.directory / 'db.sqlite3'}"
        else:
            self.env["DATABASE_URL"] = database_url or create_database(postgres, template)
            self._from_template = database_url is None and template is not None
        self._postgres = postgres
        self.gunicorn = None
        self.worker = None
        self._frozen = []
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

    def prepare_database(self):
        """Migrate the stack's database(s) and create the USERS (with PASSWORD).

        A copy of the same kind of stack's prepared database needs nothing; the
        first of its kind is kept as that copy's template.
        """
        if self._from_template:
            return
        self.migrate()
        # One process for all users (what `manage.py demo_user` does for one): each start of Django costs a second.
        self.manage("shell", "-c", CREATE_USERS.format(users=USERS, password=PASSWORD))
        if self._template_key is not None and self._template_key not in _TEMPLATES:
            _TEMPLATES[self._template_key] = self._save_template()

    def _save_template(self):
        """Keep a copy of this stack's freshly prepared database (no process holds it now); return its name."""
        if self.mode == "redis":
            if not _TEMPLATE_DIR:
                _TEMPLATE_DIR.append(Path(tempfile.mkdtemp(prefix="stack-templates-")))
                atexit.register(shutil.rmtree, _TEMPLATE_DIR[0], True)
            path = _TEMPLATE_DIR[0] / f"{uuid.uuid4().hex}.sqlite3"
            # The backup API, not a file copy: the database is in WAL mode.
            source, target = sqlite3.connect(self.directory / "db.sqlite3"), sqlite3.connect(path)
            with target:
                source.backup(target)
            source.close()
            target.close()
            return path
        import psycopg
        import psycopg.conninfo

        name = "template_" + uuid.uuid4().hex[:10]
        source = psycopg.conninfo.conninfo_to_dict(self.env["DATABASE_URL"])["dbname"]
        with psycopg.connect(self._postgres.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        return name

    def __enter__(self):
        if self.prepare:
            self.prepare_database()
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in __exit__
        self.start_gunicorn()
        if self.task_worker:
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

    def signal_host(self, sig):
        """Send ``sig`` to gunicorn's master, then to each of its workers; return their pids in that order."""
        pids = [self.gunicorn.pid, *self.worker_pids()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def crash(self):
        """Kill gunicorn's master and workers with SIGKILL, as a host that dies: nothing ends its streams.

        The master goes first, so it cannot start new workers. Return once all are dead.
        """
        pids = self.signal_host(signal.SIGKILL)
        self.gunicorn.wait()

        def dead(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # reparented, not reaped yet
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 10
        while not all(dead(pid) for pid in pids[1:]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn workers {pids[1:]} outlived SIGKILL")
            time.sleep(0.01)

    def freeze(self):
        """Stop gunicorn's master and workers (SIGSTOP), as a host that hangs or drops off the network.

        Its connections stay open and silent: the kernel still accepts new
        ones into the listen backlog, and nothing answers. ``thaw`` undoes it.
        """
        self._frozen = self.signal_host(signal.SIGSTOP)

    def thaw(self):
        """Let a frozen host go on (SIGCONT), workers first."""
        for pid in reversed(self._frozen):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._frozen = []

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
        self.thaw()
        self.stop_process(self.worker)
        self.stop_process(self.gunicorn)
        self._log_file.close()
