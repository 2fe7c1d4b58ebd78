"""/metrics on the real stack (gunicorn with 2 gevent workers, Redis): exact counts summed over both workers."""

import os
import signal
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.sse_client import SSEClient
from tests.stack import USERS, LiveStack

pytestmark = pytest.mark.e2e

METRICS_TOKEN = "stack-metrics-token-0123456789abcdef"
#: Most streams a test opens while waiting for both workers to hold some.
MAX_STREAMS = 24


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory, valkey_server):
    """The live stack with metrics on (2 workers, Redis broker), presence off (its join events are deliveries too)."""
    stack = LiveStack(
        tmp_path_factory.mktemp("stack-metrics"),
        mode="redis",
        redis_url=valkey_server.url,
        env={"MYAPP_METRICS_TOKEN": METRICS_TOKEN, "MYAPP_PRESENCE_CHANNELS": "no-presence:*"},
    )
    with stack:
        yield stack


def key(name, **labels):
    return name, tuple(sorted(labels.items()))


def scrape(stack):
    """Every sample of one scrape, as {key(name, **labels): value}."""
    response = requests.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
    assert response.status_code == 200, response.text
    return {
        key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def delivered(samples):
    return samples.get(key("myapp_events_delivered_total", path="direct"), 0) + samples.get(
        key("myapp_events_delivered_total", path="queued"), 0
    )


def wait_for_metrics(stack, expected, baseline=None, timeout=15.0):
    """Scrape until each expected figure (a key or "delivered") is ``baseline`` plus its value; return the samples.

    A scrape reaches one worker, and the other syncs its counters once a
    second: the figures settle within about a second of the last change.
    """
    baseline = baseline or {}

    def figure(samples, name):
        value = delivered(samples) if name == "delivered" else samples.get(name, 0.0)
        base = delivered(baseline) if name == "delivered" else baseline.get(name, 0.0)
        return value - base

    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(stack)
        got = {name: figure(samples, name) for name in expected}
        if got == expected:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s the metrics show {got}, expected {expected}")
        time.sleep(0.2)


def stream_url(stack, channels):
    return stack.url + "/events/?" + "&".join(f"channel={channel}" for channel in channels)


def open_on_both_workers(stack, plans, minimum=6):
    """Open streams (cycling through ``plans``, tuples of channels, and the users) until both workers hold some.

    Return [(client, channels, worker pid)].
    """
    sessions = [stack.login(user) for user in USERS]
    opened = []
    while len(opened) < minimum or len({pid for _, _, pid in opened}) < 2:
        assert len(opened) < MAX_STREAMS, f"{MAX_STREAMS} streams all landed on one worker"
        channels = plans[len(opened) % len(plans)]
        client = SSEClient(sessions[len(opened) % len(sessions)], stream_url(stack, channels))
        assert client.status == 200
        client.wait_count("stream.open", 1)
        opened.append((client, channels, stack.serving_worker(client)))
    return opened


def test_metrics_answer_only_the_token_on_the_stack(metrics_stack):
    """On the stack, /metrics wants the bearer token: 401 without, 403 with a wrong one."""
    url = metrics_stack.url + "/metrics"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=5).status_code == 403
    assert scrape(metrics_stack)[key("myapp_broker_connected")] == 1, "both workers connected at boot"


def test_counts_are_exact_summed_over_both_workers(metrics_stack):
    """Streams, channels, published, delivered, replayed, resets and closes match what was done, exactly."""
    stack = metrics_stack
    baseline = scrape(stack)
    room_a, room_b = (f"room:metrics-{name}-{uuid.uuid4().hex[:8]}" for name in "ab")
    opened = open_on_both_workers(stack, [(room_a,), (room_b,), (room_a, room_b)])
    published = {room_a: 4, room_b: 3}
    for channel, count in published.items():
        for number in range(count):
            assert stack.publish(channel, {"n": number}).status_code == 200
    for client, channels, _ in opened:
        client.wait_count("note", sum(published[channel] for channel in channels))
    held = {}  # worker pid -> channels its streams hold
    for _, channels, pid in opened:
        held.setdefault(pid, set()).update(channels)
    streams = len(opened)
    samples = wait_for_metrics(
        stack,
        {
            "delivered": sum(sum(published[channel] for channel in channels) for _, channels, _ in opened),
            key("myapp_events_published_total"): sum(published.values()),
            key("myapp_publish_seconds_count"): sum(published.values()),
            key("myapp_streams_open"): streams,
            key("myapp_streams_adopted"): streams,
            key("myapp_channels_subscribed"): sum(len(channels) for channels in held.values()),
            key("myapp_events_replayed_total"): 0,
        },
        baseline,
    )
    assert samples[key("myapp_broker_connected")] == 1

    # A resumed stream replays what came after its Last-Event-ID; a malformed one resets.
    first_client = next(client for client, channels, _ in opened if channels == (room_a,))
    first_id = first_client.of_type("note")[0].last_event_id
    session = stack.login(USERS[0])
    resumed = SSEClient(session, stream_url(stack, (room_a,)), last_event_id=first_id)
    resumed.wait_count("note", published[room_a] - 1)
    reset = SSEClient(session, stream_url(stack, (room_a,)), last_event_id="not-an-id")
    reset.wait_count("stream.reset", 1)
    wait_for_metrics(
        stack,
        {
            key("myapp_events_replayed_total"): published[room_a] - 1,
            key("myapp_stream_resets_total", reason="malformed"): 1,
            key("myapp_streams_open"): streams + 2,
        },
        baseline,
    )

    # Streams whose clients close count as disconnected; nothing stays open.
    for client in [*(client for client, _, _ in opened), resumed, reset]:
        client.close()
    final = wait_for_metrics(
        stack,
        {
            key("myapp_streams_closed_total", reason="disconnected"): streams + 2,
            key("myapp_streams_open"): 0,
            key("myapp_streams_adopted"): 0,
            key("myapp_channels_subscribed"): 0,
            "delivered": sum(sum(published[channel] for channel in channels) for _, channels, _ in opened),
        },
        baseline,
    )
    label_values = {value for _, labels in final for _, value in labels}
    assert label_values, "some metrics have labels"
    assert not label_values & {room_a, room_b, *USERS}, "no label carries a channel or a user"
    assert not any(":" in value for value in label_values), "no label value looks like a channel name"


def test_a_stopped_worker_counts_its_shutdown_closes_and_leaves_the_gauges(metrics_stack):
    """SIGTERM to a worker: its streams count as closed by shutdown, and its gauges leave the sums (child_exit)."""
    stack = metrics_stack
    baseline = scrape(stack)
    room = f"room:metrics-stop-{uuid.uuid4().hex[:8]}"
    opened = open_on_both_workers(stack, [(room,)], minimum=4)
    assert stack.publish(room, {"n": 0}).status_code == 200
    for client, _, _ in opened:
        client.wait_count("note", 1)
    wait_for_metrics(stack, {key("myapp_streams_open"): len(opened), "delivered": len(opened)}, baseline)
    victim = opened[0][2]
    stopped = [client for client, _, pid in opened if pid == victim]
    os.kill(victim, signal.SIGTERM)
    for client in stopped:
        client.wait_end(15)
    wait_for_metrics(
        stack,
        {
            key("myapp_streams_closed_total", reason="shutdown"): len(stopped),
            key("myapp_streams_open"): len(opened) - len(stopped),
            "delivered": len(opened),
        },
        baseline,
    )
    for client, _, _ in opened:
        client.close()
