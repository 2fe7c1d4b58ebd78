"""scripts/run.py and scripts/servers/: the README's run command stops what it started; PostgreSQL durability."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scripts.servers import EmbeddedPostgres
from tests.conftest import wait_until
from tests.stack import free_port

pytestmark = pytest.mark.e2e

BASE = Path(__file__).resolve().parent.parent


def start_run(tmp_path, *args):
    """``python -m scripts.run args`` with var/ in tmp_path, one web worker; return the Popen."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "MYAPP_BROKER_BACKEND", "WEB_CONCURRENCY")
    }
    env.update(
        {
            "MYAPP_VAR_DIR": str(tmp_path),
            "DJANGO_SECRET_KEY": "run-test",
            "WEB_CONCURRENCY": "1",
            "DJANGO_SETTINGS_MODULE": "config.settings",
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.run", "--port", str(free_port()), *args],
        cwd=BASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(run):
    """Kill the run command if a failed test left it running; reap it and close its pipe."""
    if run.poll() is None:
        run.kill()
    run.wait()
    run.stdout.close()


def descendants(process):
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def named(processes, word):
    """The processes whose command line contains ``word``."""
    found = []
    for process in processes:
        try:
            if any(word in part for part in process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def stop_and_collect(run, seen):
    """SIGTERM the run command; return what it printed. Fail unless it and every process in ``seen`` end in 30 s."""
    run.send_signal(signal.SIGTERM)
    try:
        output, _ = run.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    assert run.returncode == 0, output
    gone, alive = psutil.wait_procs(seen, timeout=10)
    assert not alive, f"left running after SIGTERM: {[p.cmdline() for p in alive]}"
    return output


def test_sigterm_during_migrate_stops_the_embedded_valkey(tmp_path):
    """A SIGTERM while migrate runs stops migrate and the embedded Valkey; gunicorn never starts."""
    run = start_run(tmp_path)
    seen = []
    try:

        def migrating():
            seen[:] = descendants(run)
            return named(seen, "migrate") and named(seen, "valkey")

        wait_until(migrating, timeout=60, interval=0.005, what="migrate running next to Valkey")
        output = stop_and_collect(run, seen)
        assert "running at" not in output
    finally:
        finish(run)
        for process in named(seen, "valkey"):
            process.kill()  # only when the test failed: leave no server behind


def test_postgres_run_is_durable_and_sigterm_stops_everything(tmp_path):
    """The run command's embedded PostgreSQL keeps fsync on; SIGTERM stops gunicorn, the task worker and it."""
    import psycopg

    run = start_run(tmp_path, "--postgres")
    try:
        lines = []
        deadline = time.monotonic() + 90
        while not any("running at" in line for line in lines):
            line = run.stdout.readline()
            assert line and time.monotonic() < deadline, f"the run command did not come up: {''.join(lines)}"
            lines.append(line)
        server = EmbeddedPostgres(tmp_path / "postgres")
        with psycopg.connect(server.url(), autocommit=True) as connection:
            names = ("fsync", "synchronous_commit", "full_page_writes")
            settings = {name: connection.execute(f"SHOW {name}").fetchone()[0] for name in names}
        assert settings == dict.fromkeys(names, "on")
        seen = descendants(run)
        assert named(seen, "gunicorn") and named(seen, "db_worker")
        postmaster = psutil.Process(int((server.pgdata / "postmaster.pid").read_text().split()[0]))
        stop_and_collect(run, [*seen, postmaster])
        assert not (server.pgdata / "postmaster.pid").exists()
    finally:
        finish(run)
        EmbeddedPostgres(tmp_path / "postgres").stop()  # a no-op unless the test failed


def test_embedded_postgres_is_fast_unless_durable(tmp_path):
    """EmbeddedPostgres turns fsync off by default (tests, benchmarks) and keeps it on with durable=True."""
    import psycopg

    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        for durable, expected in ((False, "off"), (True, "on")):
            server.durable = durable
            server.start()
            with psycopg.connect(server.url(), autocommit=True) as connection:
                assert connection.execute("SHOW fsync").fetchone()[0] == expected
            server.stop()
    finally:
        server.stop()
