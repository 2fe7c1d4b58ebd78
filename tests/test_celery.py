"""send_event from Celery tasks in a real prefork worker (2 processes, each recycled after one task)."""

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.sse_client import SSEClient

pytestmark = pytest.mark.e2e

BASE = Path(__file__).resolve().parent.parent


def kombu_url(redis_url):
    """The kombu URL of the redis-py URL ``redis_url`` (``unix://`` becomes ``redis+socket://``)."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


@pytest.fixture
def celery_worker(redis_stack, tmp_path):
    """Start ``celery worker`` (prefork, 2 processes, --max-tasks-per-child 1) on the stack's settings."""
    channel = f"room:celery-{uuid.uuid4().hex[:8]}"
    env = {
        **redis_stack.env,
        "CELERY_BROKER_URL": kombu_url(redis_stack.env["REDIS_URL"]),
        "CELERY_READY_CHANNEL": channel,
    }
    log = (tmp_path / "celery.log").open("wb")
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool", "prefork"]
    command += ["--concurrency", "2", "--max-tasks-per-child", "1", "--loglevel", "INFO"]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle", "--hostname", f"test-{channel}@%h"]
    worker = subprocess.Popen(command, cwd=BASE, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield worker, channel, env["CELERY_BROKER_URL"], tmp_path / "celery.log"
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        log.close()


def test_tasks_in_prefork_children_deliver_even_after_the_pool_recycles(redis_stack, celery_worker):
    """Each task's send_event reaches a stream; the third task runs in a recycled child and still delivers."""
    from celery import Celery

    worker, channel, broker_url, log = celery_worker
    session = redis_stack.login("alice")
    client = SSEClient(session, f"{redis_stack.url}/events/?channel={channel}")
    sender = Celery("sender", broker=broker_url)
    try:
        client.wait_count("stream.open", 1)
        (ready,) = client.wait_count("celery.ready", 1, timeout=60)
        parent = json.loads(ready.data)["pid"]
        assert parent == worker.pid or parent in [p.pid for p in psutil.Process(worker.pid).children()]
        first_children = {child.pid for child in psutil.Process(parent).children()}
        pids = []
        for n in range(1, 4):
            sender.send_task("tests.celery_app.notify", args=[channel, n])
            events = client.wait_count("celery.task", n, timeout=30)
            data = json.loads(events[-1].data)
            assert data["n"] == n, log.read_text()[-3000:]
            pids.append(data["pid"])
        assert len(set(pids)) == 3, "--max-tasks-per-child 1: every task in a child of its own"
        assert parent not in pids, "prefork: tasks run in the children"
        assert set(pids) - first_children, "at least one task ran in a child forked after the parent published"
    finally:
        sender.close()
        client.close()
