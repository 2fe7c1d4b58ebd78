"""Run the whole service on this machine: broker, database, web workers and task worker.

    python -m scripts.run [--postgres] [--port 8000]

Default mode: Redis broker on an embedded Valkey server (unix socket in var/)
unless REDIS_URL is set, and SQLite in var/ unless DATABASE_URL is set.
``--postgres``: PostgreSQL for everything (Django, broker, task queue), an
embedded server in var/ (crash-safe: fsync on) unless DATABASE_URL is set.
MYAPP_VAR_DIR moves var/ (as it does for Django's settings).

Migrates, creates the demo user, starts gunicorn (gevent workers) and the
django-tasks-db worker, prints the URL and login, and stops everything,
embedded servers included, on Ctrl-C or SIGTERM, whenever it comes (during
the migration too).
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts.servers import EmbeddedPostgres, EmbeddedValkey

BASE = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("MYAPP_VAR_DIR") or BASE / "var")
PYTHON = sys.executable


class Stopped(Exception):
    """SIGTERM arrived; raised in the main thread so every ``finally`` below cleans up."""


def _stop(signum, frame):
    raise Stopped


def wait_http(url, timeout, process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL for Django, the broker and the task queue")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="HTTP port on 127.0.0.1")
    args = parser.parse_args(argv)

    VAR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    servers = []
    children = []
    # Before anything starts: a SIGTERM from here on (while a server starts,
    # during migrate) unwinds through the finally below, which stops whatever
    # was started. subprocess.run kills its child when interrupted.
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.postgres:
            env["MYAPP_BROKER_BACKEND"] = "postgres"
            if not env.get("DATABASE_URL"):
                print(f"starting embedded PostgreSQL in {VAR / 'postgres'}", flush=True)
                postgres = EmbeddedPostgres(VAR / "postgres", durable=True)
                servers.append(postgres)  # before start(): a half-started server is stopped too
                postgres.start()
                env["DATABASE_URL"] = postgres.url()
        else:
            env.setdefault("MYAPP_BROKER_BACKEND", "redis")
            if not env.get("REDIS_URL"):
                valkey = EmbeddedValkey(VAR / "valkey", persist=True)
                print(f"starting embedded Valkey on {valkey.socket}", flush=True)
                servers.append(valkey)
                valkey.start()
                env["REDIS_URL"] = valkey.url

        manage = [PYTHON, str(BASE / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, check=True, cwd=BASE)
        login = subprocess.run([*manage, "demo_user"], env=env, check=True, cwd=BASE, capture_output=True, text=True)

        env["GUNICORN_BIND"] = f"127.0.0.1:{args.port}"
        gunicorn = [str(BASE / ".venv/bin/gunicorn"), "-c", "gunicorn.conf.py", "config.wsgi"]
        children.append(subprocess.Popen(gunicorn, env=env, cwd=BASE))
        children.append(subprocess.Popen([*manage, "db_worker", "--interval", "0.2", "--no-reload"], env=env, cwd=BASE))
        url = f"http://127.0.0.1:{args.port}/"
        wait_http(url + "accounts/login/", 30, children[0])
        mode = "PostgreSQL only" if args.postgres else "Redis broker + SQLite"
        banner = f"Live imports ({mode}) running at {url}\n  log in as {login.stdout.strip()}"
        print(f"\n  {banner}\n  Ctrl-C stops everything.\n", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except (KeyboardInterrupt, Stopped):
        pass
    finally:
        # Once stopping, a second signal must not cut the cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(20)  # seconds
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for server in reversed(servers):
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
