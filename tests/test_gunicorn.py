"""myapp.gunicorn: a host's two-line gunicorn.conf.py serves streams and ends them at once on SIGTERM."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_until
from tests.sse_client import SSEClient
from tests.stack import free_port

BASE = Path(__file__).resolve().parent.parent
PUBLISH_TOKEN = "gunicorn-test-publish-token-0123"
#: What docs/install.md tells a host to write (plus the bind, given on the command line).
HOST_CONFIG = 'from myapp.gunicorn import *  # noqa: F403\nworker_class = "gevent"\n'


def test_importing_the_hooks_imports_no_django():
    """gunicorn loads the config in its arbiter: importing myapp.gunicorn must not import Django or gevent."""
    code = (
        "import os, sys, resource; os.environ.pop('PSYCOPG_WAIT_FUNC', None)\n"
        "os.environ.pop('PROMETHEUS_MULTIPROC_DIR', None)\n"
        "import myapp.gunicorn as g\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('django', 'gevent', 'psycopg', 'prometheus_client')]\n"
        "assert not loaded, loaded\n"
        "assert g.__all__ == ['post_worker_init', 'on_starting', 'child_exit', 'on_exit']\n"
        "path = os.environ['PROMETHEUS_MULTIPROC_DIR']; assert os.path.isdir(path) and os.listdir(path) == []\n"
        "assert os.stat(path).st_mode & 0o077 == 0, 'private'\n"
        "assert os.environ['PSYCOPG_WAIT_FUNC'] == 'wait_poll'\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); assert soft == hard, (soft, hard)\n"
        "g.on_exit(None); assert not os.path.exists(path), 'the directory it made is removed'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=BASE, check=True, timeout=60)


def test_metrics_hooks_empty_the_directory_at_start_and_mark_exited_workers(tmp_path):
    """on_starting removes an earlier run's files; child_exit drops an exited worker's live gauges only."""
    path = tmp_path / "metrics"
    code = (
        "import os, types\n"
        "import myapp.gunicorn as g\n"
        f"path = {str(path)!r}; assert os.environ['PROMETHEUS_MULTIPROC_DIR'] == path\n"
        "g.on_starting(None); assert os.listdir(path) == [], 'created'\n"
        "for name in ('counter_7.db', 'gauge_livesum_7.db', 'notes.txt'): open(os.path.join(path, name), 'w').close()\n"
        "g.on_starting(None); assert os.listdir(path) == ['notes.txt'], 'only prometheus-client files go'\n"
        "for name in ('counter_7.db', 'gauge_livesum_7.db', 'gauge_livemin_7.db', 'gauge_livesum_8.db'):\n"
        "    open(os.path.join(path, name), 'w').close()\n"
        "g.child_exit(None, types.SimpleNamespace(pid=7))\n"
        "assert sorted(os.listdir(path)) == ['counter_7.db', 'gauge_livesum_8.db', 'notes.txt'], os.listdir(path)\n"
        "g.on_exit(None); assert os.path.isdir(path), 'a directory the environment named stays'\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    subprocess.run([sys.executable, "-c", code], cwd=BASE, env=env, check=True, timeout=60)


@pytest.fixture
def host_gunicorn(tmp_path):
    """gunicorn with only the host's two lines (memory broker, one worker): yields (url, Popen, secret key)."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(HOST_CONFIG)
    port = free_port()
    secret = "gunicorn-test-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "DATABASE_URL", "WEB_CONCURRENCY"))}
    env.update(
        {
            "HOME": str(tmp_path),  # gunicorn's control socket, if any, lands here
            "MYAPP_VAR_DIR": str(tmp_path),
            "DJANGO_SECRET_KEY": secret,
            "MYAPP_BROKER_BACKEND": "memory",
            "MYAPP_PUBLISH_TOKENS": PUBLISH_TOKEN,
            "DJANGO_SETTINGS_MODULE": "config.settings",
        }
    )
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", str(config), "-b", f"127.0.0.1:{port}", "config.wsgi"],
        cwd=BASE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert process.poll() is None, (tmp_path / "gunicorn.log").read_text()
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, timeout=30, what="gunicorn to answer /healthz")
        yield url, process, secret
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()


def test_two_line_config_serves_streams_and_sigterm_ends_them_at_once(host_gunicorn, settings):
    """The documented config serves a stream, delivers an event, and SIGTERM ends the stream within a second or so."""
    from myapp.tokens import subscription_token

    url, process, secret = host_gunicorn
    settings.SECRET_KEY = secret
    token = subscription_token(["room:gunicorn"])
    client = SSEClient(requests.Session(), f"{url}/events/?token={token}")
    try:
        assert client.status == 200
        client.wait_count("stream.open", 1)
        published = requests.post(
            url + "/api/events/",
            json={"channel": "room:gunicorn", "event_type": "note", "data": "hi"},
            headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )
        assert published.status_code == 200, published.text
        assert [m.data for m in client.wait_count("note", 1)] == ['"hi"']
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        client.wait_end(timeout=10)
        assert time.monotonic() - started < 3, "well inside gunicorn's default graceful_timeout (30 s)"
        assert "closing: shutdown" in client.parser.comments
        assert process.wait(20) == 0
    finally:
        client.close()


def test_a_worker_class_other_than_gevent_refuses_to_boot(tmp_path):
    """With the sync worker the hooks stop the server (exit 3) and say worker_class must be gevent."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(HOST_CONFIG.replace('"gevent"', '"sync"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "DATABASE_URL", "WEB_CONCURRENCY"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "MYAPP_VAR_DIR": str(tmp_path),
            "MYAPP_BROKER_BACKEND": "memory",
            "DJANGO_SETTINGS_MODULE": "config.settings",
        }
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", str(config), "-b", f"127.0.0.1:{free_port()}"]
        + ["config.wsgi"],
        cwd=BASE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert 'streams need worker_class = "gevent"' in result.stderr
