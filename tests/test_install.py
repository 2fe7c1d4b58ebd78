"""docs/install.md, followed literally: the built wheel in a fresh virtual environment and a new startproject site.

The wheel is built once per session and installed with ``--no-deps`` into a
fresh venv whose ``.pth`` file reuses this venv's installed dependencies; the
host site imports ``myapp`` from that venv, never from this checkout. Each
step's code comes from the blocks marked ``<!-- install: NAME -->`` in the doc.
"""

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_until
from tests.sse_client import SSEClient
from tests.stack import free_port

pytestmark = pytest.mark.e2e

BASE = Path(__file__).resolve().parent.parent
DOC = BASE / "docs" / "install.md"
PASSWORD = "host-password-0123"
#: The doc's name for the host project's package, and the one startproject gets here.
DOC_PROJECT, PROJECT = "myproject", "host"


def doc_blocks():
    """Return {name: code} for every ``<!-- install: name -->`` fenced block of docs/install.md."""
    blocks = dict(re.findall(r"<!-- install: (\S+) -->\n```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.DOTALL))
    assert blocks, "docs/install.md has no marked blocks"
    return {name: code.replace(DOC_PROJECT, PROJECT) for name, code in blocks.items()}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The project's wheel, built once with ``python -m build`` (sdist, then the wheel from the sdist).

    Building the wheel from the sdist also keeps stale files of a checkout's
    ``build/`` folder out of it.
    """
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(BASE)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("myapp_push-*.whl")
    return built


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory, wheel):
    """A new venv with only the wheel installed (--no-deps); this venv's site-packages supply the dependencies."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # A plain path line (not site.addsitedir): this venv's own .pth files, such
    # as the editable install of this checkout, stay unprocessed.
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    return venv


def test_wheel_holds_only_the_package(wheel):
    """The wheel lists myapp and its metadata only: no config/, worker_tasks/, bench/, tests/, demo file or template."""
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name.startswith(("myapp/", "myapp_push-")) for name in names), names
    for part in ("templates/", "app.js", "job.js", "app.css", "demo", "worker_tasks", "config/", "bench/", "tests/"):
        assert not [name for name in names if part in name], part
    for shipped in (
        "myapp/static/myapp/push.js",
        "myapp/static/myapp/vendor/eventsource.min.js",
        "myapp/brokers/postgres/migrations/0001_initial.py",
        "myapp/gunicorn.py",
    ):
        assert shipped in names
    assert not [name for name in names if name.startswith("myapp/migrations/")], "myapp itself has no models"


def test_myapp_imports_nothing_of_the_demo():
    """No module under myapp/ imports the demo site (config), worker_tasks, tests or bench; myapp has no templates."""
    offenders = []
    for path in (BASE / "myapp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offenders += [
                (str(path), m) for m in modules if m.split(".")[0] in ("config", "worker_tasks", "tests", "bench")
            ]
    assert offenders == []
    assert not list((BASE / "myapp").rglob("templates")), "a host would pick up myapp's templates"


class Host:
    """A ``startproject`` site in ``directory``, run with the fresh venv's Python."""

    def __init__(self, directory, venv, env):
        self.directory = directory
        self.python = str(venv / "bin" / "python")
        self.env = env

    def run(self, argv, **kwargs):
        """Run a doc command line (``python ...`` / ``gunicorn ...``) with the fresh venv; return stdout."""
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if argv[0] == "python":
            argv[0] = self.python
        elif argv[0] == "gunicorn":
            argv[:1] = [self.python, "-m", "gunicorn"]
        result = subprocess.run(
            argv, cwd=self.directory, env=self.env, capture_output=True, text=True, timeout=120, **kwargs
        )
        assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def manage(self, *args):
        return self.run(["python", "manage.py", *args])

    def append(self, relative, code):
        path = self.directory / relative
        path.write_text(path.read_text() + "\n" + code if path.exists() else code)


def host_env(tmp_path, venv):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MYAPP_", "DJANGO_", "PG", "PYTHON", "REDIS_URL", "DATABASE_URL", "WEB_CONCURRENCY"))
        and key not in ("VIRTUAL_ENV",)
    }
    env.update({"HOME": str(tmp_path), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
    env["DJANGO_SUPERUSER_PASSWORD"] = PASSWORD
    return env


def postgres_env(postgres_server):
    """PG* variables for a new database on the test server (libpq reads them)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    dbname = "host_" + uuid.uuid4().hex[:10]
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{dbname}"')
    info = conninfo_to_dict(postgres_server.url(dbname))
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE"}
    return {names[key]: str(value) for key, value in info.items() if key in names and value}


@pytest.mark.parametrize("broker", ["redis", "postgres"])
def test_install_doc_in_a_new_project(request, tmp_path, fresh_venv, broker):
    """Every step of docs/install.md in a startproject site: check, migrate, gunicorn, and events from 5 publishers."""
    blocks = doc_blocks()
    env = host_env(tmp_path, fresh_venv)
    if broker == "redis":
        env["REDIS_URL"] = request.getfixturevalue("valkey_server").url
    else:
        env.update(postgres_env(request.getfixturevalue("postgres_server")))
    site = tmp_path / "site"
    site.mkdir()
    host = Host(site, fresh_venv, env)
    host.run(["python", "-m", "django", "startproject", PROJECT, "."])
    where = host.run(["python", "-c", "import myapp; print(myapp.__file__)"]).strip()
    assert where.startswith(str(fresh_venv)), f"myapp comes from {where}, not the installed wheel"

    host.append(f"{PROJECT}/settings.py", blocks[f"settings-{broker}"])
    host.append(f"{PROJECT}/urls.py", blocks["urls"])
    host.append(f"{PROJECT}/views.py", blocks["view"])
    host.append(f"{PROJECT}/urls.py", blocks["view-url"])
    host.append(f"{PROJECT}/tasks.py", blocks["django-tasks"])
    host.append(f"{PROJECT}/celery_tasks.py", blocks["celery"])
    host.append("gunicorn.conf.py", blocks["gunicorn.conf.py"])

    assert "System check identified no issues" in host.manage("check")
    host.manage("migrate", "--noinput")
    tables = host.manage(
        "shell", "-v", "0", "-c", "from django.db import connection; print(connection.introspection.table_names())"
    )
    if broker == "redis":
        assert "myapp" not in tables, "the Redis broker needs no table"
    else:
        assert "'myapp_postgres_event'" in tables and "'myapp_postgres_state'" in tables
    host.manage("createsuperuser", "--noinput", "--username", "alice", "--email", "alice@example.com")
    template = host.manage(
        "shell",
        "-v",
        "0",
        "-c",
        "from django.template import engines; from django.contrib.staticfiles import finders; "
        f"html = engines['django'].from_string({blocks['template']!r}).render(); "
        "assert finders.find('myapp/push.js') and finders.find('myapp/vendor/eventsource.min.js'); print(html)",
    )
    assert 'new PushStream("/events/")' in template and "/static/myapp/push.js" in template

    port = free_port()
    (command,) = blocks["gunicorn"].strip().splitlines()
    argv = shlex.split(command.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    argv[:1] = [host.python, "-m", "gunicorn"]
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(argv, cwd=site, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    clients = []
    try:

        def up():
            assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                return requests.get(url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout=30, what="the host's gunicorn")
        session = admin_login(url)
        stream = SSEClient(session, url + "/events/")
        clients.append(stream)
        assert stream.status == 200
        (opened,) = stream.wait_count("stream.open", 1)
        assert '"channels":["user:1"]' in opened.data.replace(" ", "")
        curl = subprocess.Popen(
            ["bash", "-c", blocks["curl"].replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
            cwd=site,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        clients.append(curl)

        publishers = {
            "manage.py send_event": lambda: host.run(blocks["send_event"].strip()),
            "manage.py shell -c": lambda: host.run(blocks["shell"].strip()),
            "a view": lambda: session.post(url + "/notify-me/", headers={"X-CSRFToken": session.cookies["csrftoken"]}),
            "a django-tasks task": lambda: host.manage(
                "shell", "-c", f"from {PROJECT}.tasks import build_report; build_report.call(1)"
            ),
            "a Celery task": lambda: host.manage(
                "shell", "-c", f"from {PROJECT}.celery_tasks import build_report; build_report(1)"
            ),
        }
        for count, (name, publish) in enumerate(publishers.items(), start=1):
            publish()
            events = stream.wait_count("report.ready", count, timeout=15)
            assert events[-1].data == '{"url":"/reports/1/"}', name
        curl_output = read_until(curl, b"report.ready", timeout=15)
        assert b'data: {"url":"/reports/1/"}' in curl_output
        assert server_stop(server) < 5, "SIGTERM ends the streams at once (myapp.gunicorn)"
        stream.wait_end(timeout=10)
        assert "closing: shutdown" in stream.parser.comments
    finally:
        for client in clients:
            if isinstance(client, subprocess.Popen):
                os.killpg(client.pid, signal.SIGKILL)
                client.wait()
                client.stdout.close()
            else:
                client.close()
        if server.poll() is None:
            server.kill()
        server.wait()
        log.close()


def admin_login(url, username="alice"):
    """Log in through Django's admin login form (the page startproject sets up); return the session."""
    session = requests.Session()
    session.get(url + "/admin/login/", timeout=10)
    response = session.post(
        url + "/admin/login/",
        data={
            "username": username,
            "password": PASSWORD,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
            "next": "/admin/",
        },
        timeout=10,
        allow_redirects=False,
    )
    assert response.status_code == 302, response.text[:500]
    return session


def read_until(process, marker, timeout):
    """Read ``process``'s stdout until ``marker`` and the blank line after it arrived; return what was read."""
    import selectors
    import time

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    data = b""
    deadline = time.monotonic() + timeout
    while not (marker in data and b"\n\n" in data[data.index(marker) :]):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"curl printed {data!r}"
        if selector.select(remaining):
            chunk = os.read(process.stdout.fileno(), 65536)
            assert chunk, f"curl ended: {data!r}"
            data += chunk
    return data


def server_stop(server):
    """SIGTERM gunicorn; return the seconds it took to exit."""
    import time

    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server.wait(20)
    return time.monotonic() - started
