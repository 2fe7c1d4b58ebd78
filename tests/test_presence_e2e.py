"""Presence and control messages on the real stack: two gunicorn workers, a second gunicorn master, one Valkey."""

import json
import signal
import time

import psutil
import pytest
import requests

from myapp.brokers.redis import RedisBroker
from tests.conftest import wait_until
from tests.sse_client import SSEClient
from tests.stack import PASSWORD, PUBLISH_TOKEN, LiveStack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def second_host(tmp_path_factory, valkey_server):
    """Another gunicorn master (its own port, database and workers) on the same Valkey: a second host."""
    stack = LiveStack(tmp_path_factory.mktemp("stack-second-host"), mode="redis", redis_url=valkey_server.url)
    with stack:
        yield stack


def _who(stack, channel):
    """The users present on ``channel`` as the broker sums them over the live hubs (list of user ids)."""
    broker = RedisBroker(url=stack.env["REDIS_URL"])
    try:
        return sorted(member for member in broker.presence_read("c:" + channel) if member != "-")
    finally:
        broker.close()


def _user_id(stack, session):
    (channel,) = session.get(stack.url + "/events/?check=1", timeout=5).json()["channels"]
    return channel.partition(":")[2]


def _streams_on_both_workers(stack, session, url, count=2):
    """Open streams until they are held by ``count`` different workers; return {pid: client} (others closed)."""
    held, spare = {}, []
    deadline = time.monotonic() + 20
    while len(held) < count:
        assert time.monotonic() < deadline, "streams never landed on every worker"
        client = SSEClient(session, url)
        assert client.status == 200, client.response.text
        client.wait_count("stream.open", 1)
        pid = stack.serving_worker(client)
        if pid in held:
            spare.append(client)
        else:
            held[pid] = client
    for client in spare:
        client.close()
    return held


def test_presence_spans_workers_and_hosts_and_forgets_a_killed_worker(redis_stack, second_host):
    """Users on two workers and on a second master are all present; a worker killed with SIGKILL drops out."""
    channel = "room:presence-e2e"
    url = "/events/?channel=" + channel
    alice, carol = redis_stack.login("alice"), redis_stack.login("carol")
    bob_elsewhere = second_host.login("bob")
    watcher = SSEClient(redis_stack.login("bob"), redis_stack.url + url)
    watcher.wait_count("stream.open", 1)
    on_workers = _streams_on_both_workers(redis_stack, alice, redis_stack.url + url)
    far = SSEClient(bob_elsewhere, second_host.url + url)
    far.wait_count("stream.open", 1)
    ids = {
        name: _user_id(stack, session)
        for name, stack, session in (
            ("alice", redis_stack, alice),
            ("bob", second_host, bob_elsewhere),
            ("carol", redis_stack, carol),
        )
    }
    wait_until(lambda: _who(redis_stack, channel) == sorted({ids["alice"], ids["bob"]}), what="alice and bob")
    watcher.wait_for(
        lambda ms: {json.loads(m.data)["user"] for m in ms if m.type == "presence.join"} >= {ids["alice"]},
        what="alice's presence.join",
    )

    # Carol's only stream is on one worker, alice has one on each: kill carol's worker.
    carol_stream = SSEClient(carol, redis_stack.url + url)
    carol_stream.wait_count("stream.open", 1)
    victim = redis_stack.serving_worker(carol_stream)
    wait_until(lambda: ids["carol"] in _who(redis_stack, channel), what="carol")
    killed_at = time.monotonic()
    psutil.Process(victim).send_signal(signal.SIGKILL)
    heartbeat = float(redis_stack.env["MYAPP_HEARTBEAT_SECONDS"])
    wait_until(lambda: ids["carol"] not in _who(redis_stack, channel), timeout=2 * heartbeat + 3, what="carol gone")
    gone_in = time.monotonic() - killed_at
    assert ids["alice"] in _who(redis_stack, channel), "alice still has a stream on the surviving worker"
    print(f"presence after SIGKILL of a worker: its user gone in {gone_in:.2f} s (heartbeat {heartbeat} s)")
    for client in [watcher, far, carol_stream, *on_workers.values()]:
        client.close()
    wait_until(lambda: len(redis_stack.worker_pids()) == 2, timeout=30, what="gunicorn to replace the worker")
    redis_stack.wait_ready()


def test_disconnect_ends_a_users_streams_on_every_worker_and_revocation_answers_403(redis_stack):
    """Revoke a staff user's access, then unsubscribe: their streams on both workers end within a second."""
    redis_stack.manage("demo_user", "--username", "dave", "--password", PASSWORD)
    redis_stack.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; User.objects.filter(username='dave').update(is_staff=True)",
    )
    dave = redis_stack.login("dave")
    user = _user_id(redis_stack, dave)
    url = redis_stack.url + "/events/?channel=room:staff"
    streams = _streams_on_both_workers(redis_stack, dave, url)
    redis_stack.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; User.objects.filter(username='dave').update(is_staff=False)",
    )
    started = time.monotonic()
    sent = redis_stack.manage("push_control", "unsubscribe", user, "room:staff")  # publishes as it exits
    sent_at = time.monotonic()
    assert sent.stdout.strip()
    for client in streams.values():
        client.wait_for(lambda ms: any(m.type == "stream.end" for m in ms), timeout=1.5, what="stream.end")
        (end,) = client.of_type("stream.end")
        assert json.loads(end.data) == {"reason": "unsubscribe", "reconnect": True}
        client.wait_end(timeout=1.5)
    ended_in = time.monotonic() - sent_at
    print(
        f"unsubscribe: both workers' streams ended {ended_in * 1000:.0f} ms after the command returned "
        f"(the command took {(sent_at - started) * 1000:.0f} ms, mostly Django's start-up)"
    )
    again = dave.get(url, stream=True, timeout=10)
    again.close()
    assert again.status_code == 403, "the reconnect is authorized again, and refused"


def test_disconnect_over_the_control_api_ends_streams_on_both_workers_and_push_js_is_told_to_stop(redis_stack):
    """POST /api/control/ disconnect: the user's streams on both workers end within a second with reconnect false."""
    redis_stack.manage("demo_user", "--username", "erin", "--password", PASSWORD)
    erin = redis_stack.login("erin")
    user = _user_id(redis_stack, erin)
    streams = _streams_on_both_workers(redis_stack, erin, redis_stack.url + "/events/")
    response = requests.post(
        redis_stack.url + "/api/control/",
        json={"action": "disconnect", "user": user},
        headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
        timeout=10,
    )
    sent_at = time.monotonic()
    assert response.status_code == 200, response.text
    for client in streams.values():
        client.wait_for(lambda ms: any(m.type == "stream.end" for m in ms), timeout=1.0, what="stream.end")
        (end,) = client.of_type("stream.end")
        assert json.loads(end.data) == {"reason": "disconnect", "reconnect": False}
        client.wait_end(timeout=1.0)
    ended_ms = (time.monotonic() - sent_at) * 1000
    print(f"control API disconnect: both workers' streams ended {ended_ms:.0f} ms after the 200")
