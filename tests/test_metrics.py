"""Metrics in-process: the sync of the hub's counters into Prometheus metrics, publishes, GET /metrics."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.test import Client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from myapp import metrics
from myapp.exceptions import BrokerUnavailable
from myapp.metrics import HubMetrics
from myapp.publish import send_event
from tests.conftest import wait_until
from tests.test_counters import FlakyBroker, served

BASE = Path(__file__).resolve().parent.parent
TOKEN = "metrics-test-token-0123456789abcdef"


@pytest.fixture
def metrics_on(settings):
    """Metrics on (MYAPP_METRICS_TOKEN set); list it before broker fixtures, as it resets the process's broker."""
    settings.MYAPP_METRICS_TOKEN = TOKEN


@pytest.fixture
def broker():
    return FlakyBroker(history_length=100, history_ttl=60)


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def pair():
    sock, peer = socket.socketpair()
    yield sock, peer
    sock.close()
    peer.close()


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def process_value(name, **labels):
    """A sample of this process's own metrics (those /metrics serves here)."""
    return value(metrics._registry.get(), name, **labels)


def test_outage_seconds_grow_during_an_outage_and_end_at_the_outage_length(broker, hub_factory, registry):
    """Disconnected seconds grow while an outage runs and end at its length; the reconnection counts once."""
    hub = hub_factory(broker, heartbeat_interval=30, reconnect_delay=(0.05, 0.1))
    synced = HubMetrics(registry)
    broker.refuse.set()
    broker.listeners[-1].close()
    wait_until(lambda: not hub.connected, what="the hub to notice")
    wait_until(lambda: hub.outage_started is not None, what="the outage to start")
    wait_until(lambda: time.monotonic() - hub.outage_started > 0.2, what="a 0.2 s outage")
    synced.sync(hub)
    during = value(registry, "myapp_broker_disconnected_seconds_total")
    assert during > 0.1
    assert value(registry, "myapp_broker_connected") == 0
    broker.refuse.clear()
    wait_until(lambda: hub.connected, what="the reconnection")
    synced.sync(hub)
    assert hub.counters.reconnects == 1 and hub.counters.outage_seconds >= during
    assert value(registry, "myapp_broker_reconnects_total") == 1
    assert value(registry, "myapp_broker_disconnected_seconds_total") == pytest.approx(hub.counters.outage_seconds)
    assert value(registry, "myapp_broker_connected") == 1


# -- the sync into Prometheus metrics ------------------------------------------------


def test_sync_moves_exactly_what_changed_and_sets_the_gauges(broker, hub_factory, registry, pair):
    """Each sync adds only the counts since the last one; gauges show the hub as it is now."""
    hub = hub_factory(broker, heartbeat_interval=30)
    synced = HubMetrics(registry)
    served(hub, pair[0], channels=("room:a", "room:b"))
    hub.subscribe(["room:a"])
    broker.publish("room:a", "t", "1")
    wait_until(lambda: hub.counters.direct == 1 and hub.counters.queued == 1, what="the first event")
    synced.sync(hub)
    synced.sync(hub)  # nothing new: nothing added
    assert value(registry, "myapp_events_delivered_total", path="direct") == 1
    assert value(registry, "myapp_events_delivered_total", path="queued") == 1
    assert value(registry, "myapp_streams_open") == 2
    assert value(registry, "myapp_channels_subscribed") == 2
    assert value(registry, "myapp_broker_connected") == 1
    broker.publish("room:b", "t", "2")
    wait_until(lambda: hub.counters.direct == 2, what="the second event")
    synced.sync(hub)
    assert value(registry, "myapp_events_delivered_total", path="direct") == 2
    assert value(registry, "myapp_events_delivered_total", path="queued") == 1
    for reason in metrics.CLOSE_REASONS:
        assert registry.get_sample_value("myapp_streams_closed_total", {"reason": reason}) == 0, "exists at 0"


def test_a_replaced_hub_keeps_the_old_ones_last_counts(broker, hub_factory, registry):
    """When the hub is replaced, what the old one counted since the last sync still reaches the metrics."""
    synced = HubMetrics(registry)
    old = hub_factory(broker, heartbeat_interval=30)
    subs = [old.subscribe(["room:a"]) for _ in range(2)]
    synced.sync(old)
    old.stop()  # closes both: "hub stopped"
    assert all(sub.closed for sub in subs)
    new = hub_factory(broker, heartbeat_interval=30)
    new.subscribe(["room:b"]).close()
    synced.sync(new)
    assert value(registry, "myapp_streams_closed_total", reason="hub stopped") == 2
    assert value(registry, "myapp_streams_closed_total", reason="unsubscribed") == 1
    assert value(registry, "myapp_streams_open") == 0
    synced.sync(None)
    assert value(registry, "myapp_broker_connected") == 0, "no hub: no connection"


def test_a_reason_outside_the_known_set_is_labelled_other(broker, hub_factory, registry):
    """Label values come from fixed sets: anything else is counted as "other"."""
    hub = hub_factory(broker, heartbeat_interval=30)
    hub.counters.closed("room:secret")
    hub.counters.reset("user:7", 1)
    HubMetrics(registry).sync(hub)
    assert value(registry, "myapp_streams_closed_total", reason="other") == 1
    assert value(registry, "myapp_stream_resets_total", reason="other") == 1


# -- publishes ------------------------------------------------------------------------


def test_send_event_counts_accepted_publishes_their_latency_and_failures(metrics_on, memory_broker, monkeypatch):
    """Every accepted event counts once with its latency observed; a refused publish counts as an error."""
    names = ("myapp_events_published_total", "myapp_publish_seconds_count", "myapp_publish_errors_total")
    before = [process_value(name) for name in names]
    seconds = process_value("myapp_publish_seconds_sum")
    for number in range(3):
        send_event("room:a", "t", number)

    def refuse(*args, **kwargs):
        raise BrokerUnavailable("down")

    monkeypatch.setattr(memory_broker, "publish", refuse)
    with pytest.raises(BrokerUnavailable):
        send_event("room:a", "t", 3)
    assert [process_value(name) - old for name, old in zip(names, before, strict=True)] == [3, 3, 1]
    assert 0 < process_value("myapp_publish_seconds_sum") - seconds < 3


def test_send_event_counts_nothing_with_metrics_off(memory_broker):
    """With metrics off, publishing touches no metric."""
    before = process_value("myapp_events_published_total")
    send_event("room:a", "t", 1)
    assert process_value("myapp_events_published_total") == before


def test_with_metrics_off_nothing_imports_prometheus_client(tmp_path):
    """Metrics off (the default): URLs load, events publish, and prometheus-client is never imported."""
    code = (
        "import sys, django; django.setup()\n"
        "import myapp.urls\n"
        "from myapp.publish import send_event\n"
        "send_event('room:a', 't', 1)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "DATABASE_URL", "PROMETHEUS"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "MYAPP_VAR_DIR": str(tmp_path),
            "DJANGO_SECRET_KEY": "metrics-off",
            "MYAPP_BROKER_BACKEND": "memory",
        }
    )
    subprocess.run([sys.executable, "-c", code], cwd=BASE, env=env, check=True, timeout=60)


# -- GET /metrics -----------------------------------------------------------------------


def test_metrics_are_off_by_default_and_answer_404(memory_broker):
    """Without MYAPP_METRICS_TOKEN, /metrics does not exist, token or not."""
    assert Client().get("/metrics").status_code == 404
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 404


def test_metrics_need_the_bearer_token(metrics_on, memory_broker):
    """401 without a token, 403 with a wrong one, 405 for POST, 200 with the right one."""
    missing = Client().get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Basic dXNlcjpwdw==").status_code == 401
    wrong = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}x")
    assert wrong.status_code == 403 and json.loads(wrong.content) == {"error": "invalid metrics token"}
    assert Client().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response["Cache-Control"] == "no-store"
    names = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert {
        "myapp_streams_open",
        "myapp_streams_adopted",
        "myapp_channels_subscribed",
        "myapp_broker_connected",
        "myapp_events_published",
        "myapp_publish_errors",
        "myapp_publish_seconds",
        "myapp_events_delivered",
        "myapp_events_replayed",
        "myapp_stream_resets",
        "myapp_streams_closed",
        "myapp_broker_reconnects",
        "myapp_broker_disconnected_seconds",
    } <= names


def test_openmetrics_when_the_scraper_asks_for_it(metrics_on, memory_broker):
    """A scraper that accepts OpenMetrics gets it (prometheus-client's content negotiation)."""
    response = Client().get(
        "/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0"
    )
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.endswith(b"# EOF\n")


def test_the_scrape_counts_this_process_exactly_and_no_label_names_a_channel(metrics_on, memory_broker):
    """Streams and events show up in the answering process's scrape at once; no label value is a channel."""
    from myapp.hub import get_hub

    def scrape():
        body = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }

    before = scrape()
    channels = ["room:metrics-secret", "user:4242"]
    subs = [get_hub().subscribe(channels) for _ in range(3)]
    for channel in channels:
        send_event(channel, "t", {"to": channel})
    wait_until(lambda: get_hub().counters.queued == 6, what="6 queued events")
    after = scrape()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("myapp_events_published_total") == 2
    assert grew("myapp_events_delivered_total", path="queued") == 6
    assert after[("myapp_streams_open", ())] == 3
    assert after[("myapp_channels_subscribed", ())] == 2
    label_values = {value for _, labels in after for _, value in labels}
    assert not label_values & set(channels) and not any(":" in value for value in label_values)
    for sub in subs:
        sub.close()
