"""Durable publishing in-process: the outbox row, the relay on PostgreSQL and SQLite, faults, checks.

The relay runs in a thread of the test process against the test database
(PostgreSQL) or a SQLite file, publishing to the memory broker (or a broker
that can be switched off). The real stack's tests are in test_outbox_e2e.py.
"""

import logging
import sqlite3
import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction

from myapp import checks
from myapp.brokers import get_broker
from myapp.exceptions import BrokerUnavailable, InvalidEvent
from myapp.outbox.models import OutboxEvent
from myapp.outbox.relay import Relay
from myapp.outbox.sources import PostgresSource, SourceUnavailable, SQLiteSource
from myapp.publish import send_event
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def history(channel):
    return [(e.event_type, e.data) for e in get_broker().history([channel], 0).events]


class SwitchableBroker:
    """The memory broker behind a switch: while ``down``, every call raises BrokerUnavailable."""

    def __init__(self, broker):
        self.broker = broker
        self.down = False
        self.calls = 0

    def _check(self):
        self.calls += 1
        if self.down:
            raise BrokerUnavailable("switched off")

    def publish(self, *args, **kwargs):
        self._check()
        return self.broker.publish(*args, **kwargs)

    def last_position(self):
        self._check()
        return self.broker.last_position()


@pytest.fixture
def relays():
    """Start relays in threads: ``relays(source, **options)``; all stop at teardown."""
    started = []

    def start(source, **options):
        options.setdefault("get_broker", get_broker)
        options.setdefault("poll_seconds", 0.05)
        options.setdefault("backoff", (0.02, 0.1))
        relay = Relay(source, **options)
        thread = threading.Thread(target=relay.run, daemon=True)
        thread.start()
        started.append((relay, thread))
        return relay

    yield start
    for relay, _ in started:
        relay.stop()
    for _, thread in started:
        thread.join(10)
        assert not thread.is_alive(), "a relay did not stop"


# -- writing ------------------------------------------------------------------


def test_durable_send_event_writes_a_row_and_publishes_nothing(memory_broker):
    """durable=True inserts the validated event into the outbox, returns None, and does not touch the broker."""
    assert send_event("room:a", "note", {"n": 1}, durable=True) is None
    (row,) = OutboxEvent.objects.all()
    assert (row.channel, row.event_type, bytes(row.data)) == ("room:a", "note", b'{"n":1}')
    assert len(row.idempotency_key) == 32, "a generated uuid4 hex key"
    assert history("room:a") == []


def test_the_publishers_id_is_the_idempotency_key(memory_broker):
    """A publisher-chosen id becomes the row's idempotency key."""
    send_event("room:a", "note", 1, id="msg-7781", durable=True)
    assert OutboxEvent.objects.get().idempotency_key == "msg-7781"


@pytest.mark.parametrize(
    ("channel", "event_type", "data", "raw"),
    [("bad channel", "note", 1, False), ("room:a", "a\nb", 1, False), ("room:a", "note", 5, True)],
    ids=["channel", "event type", "raw not a str"],
)
def test_bad_input_raises_at_the_call_and_writes_nothing(memory_broker, channel, event_type, data, raw):
    """Validation runs before the insert: InvalidEvent at the call, no row."""
    with pytest.raises(InvalidEvent):
        send_event(channel, event_type, data, raw=raw, durable=True)
    assert not OutboxEvent.objects.exists()


def test_rows_follow_the_callers_transaction(memory_broker):
    """Inside atomic() the row commits with the caller's writes and disappears with a rollback."""
    with transaction.atomic():
        send_event("room:a", "note", "kept", durable=True)
    with pytest.raises(RuntimeError), transaction.atomic():
        send_event("room:a", "note", "dropped", durable=True)
        raise RuntimeError("the caller fails")
    assert [bytes(row.data) for row in OutboxEvent.objects.all()] == [b'"kept"']


def test_the_setting_makes_durable_the_default(memory_broker, settings):
    """MYAPP_DURABLE_PUBLISH = True sends to the outbox unless durable=False."""
    settings.MYAPP_DURABLE_PUBLISH = True
    assert send_event("room:a", "note", 1) is None
    assert send_event("room:a", "note", 2, durable=False) is not None
    assert OutboxEvent.objects.count() == 1
    assert history("room:a") == [("note", "2")]


def test_durable_without_the_app_says_what_to_add(memory_broker, settings):
    """durable=True without myapp.outbox installed: ImproperlyConfigured naming the app."""
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "myapp.outbox"]
    with pytest.raises(ImproperlyConfigured, match='add "myapp.outbox"'):
        send_event("room:a", "note", 1, durable=True)


def test_durable_to_a_database_without_relay_is_refused(memory_broker, settings):
    """A ``using`` outside MYAPP_OUTBOX_DATABASES would never be relayed: ImproperlyConfigured."""
    settings.MYAPP_OUTBOX_DATABASES = ["other"]
    with pytest.raises(ImproperlyConfigured, match="MYAPP_OUTBOX_DATABASES"):
        send_event("room:a", "note", 1, durable=True)


def test_a_durable_publish_notifies_at_commit():
    """On PostgreSQL the durable publish signals NOTIFY myapp_outbox, delivered at COMMIT and not on rollback."""
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params, autocommit=True) as listener:
        listener.execute("LISTEN myapp_outbox")
        with transaction.atomic():
            send_event("room:a", "note", 1, durable=True)
            send_event("room:a", "note", 2, durable=True)
            assert list(listener.notifies(timeout=0.2)) == [], "nothing before COMMIT"
        notified = list(listener.notifies(timeout=2, stop_after=1))
        assert [n.channel for n in notified] == ["myapp_outbox"], "one notification for the transaction"
        with pytest.raises(RuntimeError), transaction.atomic():
            send_event("room:a", "note", 3, durable=True)
            raise RuntimeError
        assert list(listener.notifies(timeout=0.3)) == []


def test_send_event_command_queues_durably(memory_broker, capsys):
    """manage.py send_event --durable writes to the outbox and prints "queued"."""
    from django.core.management import call_command

    call_command("send_event", "room:ops", "maintenance", '{"at": "22:00"}', "--durable")
    assert capsys.readouterr().out.strip() == "queued"
    assert bytes(OutboxEvent.objects.get(channel="room:ops").data) == b'{"at":"22:00"}'
    assert history("room:ops") == []


# -- the relay on PostgreSQL -------------------------------------------------------


def test_relay_publishes_in_order_and_deletes(memory_broker, relays):
    """Rows already waiting and rows written later are published once, in id order, and deleted."""
    for n in range(250):  # more than two batches
        send_event(f"room:{n % 3}", "note", n, durable=True)
    relay = relays(PostgresSource("default"))
    for n in range(250, 260):
        send_event(f"room:{n % 3}", "note", n, durable=True)
    wait_until(lambda: relay.published == 260, what="260 events published")
    for channel in range(3):
        assert [int(data) for _, data in history(f"room:{channel}")] == list(range(channel, 260, 3))
    assert not OutboxEvent.objects.exists()


def test_notify_wakes_the_relay_before_its_poll(memory_broker, relays):
    """With a 30 s poll interval, a committed durable event is still published within a second (NOTIFY)."""
    relay = relays(PostgresSource("default"), poll_seconds=30)
    wait_until(lambda: relay.active, what="the relay to become active")
    time.sleep(0.2)  # the relay is waiting now
    started = time.monotonic()
    send_event("room:a", "note", "wake", durable=True)
    wait_until(lambda: history("room:a"), timeout=5, what="the event")
    assert time.monotonic() - started < 1.0


def test_one_relay_is_active_and_a_standby_takes_over(memory_broker, relays):
    """Two relays on one database: one holds the lock; when it stops, the other publishes."""
    first = relays(PostgresSource("default"))
    wait_until(lambda: first.active, what="the first relay active")
    second = relays(PostgresSource("default"))
    time.sleep(0.3)
    assert not second.active, "the second one stands by"
    send_event("room:a", "note", 1, durable=True)
    wait_until(lambda: first.published == 1, what="the active relay publishes")
    first.stop()
    wait_until(lambda: second.active, what="the standby takes over")
    send_event("room:a", "note", 2, durable=True)
    wait_until(lambda: second.published == 1, what="the new active relay publishes")
    assert history("room:a") == [("note", "1"), ("note", "2")]


def test_two_relays_each_row_once_in_order(memory_broker, relays):
    """Two relays and a publisher racing them: every event once, per-channel order kept."""
    pair = [relays(PostgresSource("default")), relays(PostgresSource("default"))]
    for n in range(600):
        with transaction.atomic():
            send_event(f"room:{n % 4}", "note", n, durable=True)
    wait_until(lambda: sum(relay.published for relay in pair) == 600, timeout=30, what="600 published")
    for channel in range(4):
        assert [int(data) for _, data in history(f"room:{channel}")] == list(range(channel, 600, 4))


def test_broker_outage_delays_and_never_loses(memory_broker, relays, caplog):
    """While the broker is down rows stay; afterwards each goes out once, in order; the outage is logged once."""
    broker = SwitchableBroker(memory_broker)
    broker.down = True
    relay = relays(PostgresSource("default"), get_broker=lambda: broker)
    with caplog.at_level(logging.INFO, logger="myapp.outbox"):
        for n in range(5):
            send_event("room:a", "note", n, durable=True)
        wait_until(lambda: broker.calls >= 5, what="several retries")
        assert OutboxEvent.objects.count() == 5 and history("room:a") == []
        broker.down = False
        wait_until(lambda: relay.published == 5, what="the events after recovery")
    assert [data for _, data in history("room:a")] == ["0", "1", "2", "3", "4"]
    assert caplog.text.count("broker unavailable") == 1
    assert caplog.text.count("broker back after") == 1


def test_broker_failing_mid_batch_keeps_order(memory_broker, relays):
    """A broker that fails after some rows of a batch: the published ones are deleted, the rest follow in order."""
    broker = SwitchableBroker(memory_broker)
    real_publish = broker.publish

    def publish(channel, event_type, data, **kwargs):
        if data == "3" and not getattr(publish, "failed", False):
            publish.failed = True
            raise BrokerUnavailable("fails once, at event 3")
        return real_publish(channel, event_type, data, **kwargs)

    broker.publish = publish
    for n in range(6):
        send_event("room:a", "note", n, durable=True)
    relay = relays(PostgresSource("default"), get_broker=lambda: broker)
    wait_until(lambda: relay.published == 6, what="all six")
    assert [data for _, data in history("room:a")] == ["0", "1", "2", "3", "4", "5"]


def test_a_row_published_twice_is_delivered_once(memory_broker, relays, monkeypatch):
    """A relay that dies between publish and delete: the next one republishes with the same key; nothing doubles."""
    for n in range(3):
        send_event("room:a", "note", n, durable=True)
    failing = PostgresSource("default")

    def lost(ids):
        failing.disconnect()
        raise SourceUnavailable("connection lost before the delete")

    monkeypatch.setattr(failing, "delete", lost)
    broken = relays(failing)
    wait_until(lambda: len(history("room:a")) == 3, what="the first publish")
    broken.stop()
    relay = relays(PostgresSource("default"))
    wait_until(lambda: relay.published == 3, what="the second relay's publish")
    assert [data for _, data in history("room:a")] == ["0", "1", "2"], "delivered once"
    assert not OutboxEvent.objects.exists()


def test_a_row_the_broker_refuses_is_dropped_and_the_rest_go_on(memory_broker, relays, caplog):
    """InvalidEvent from the broker (it can never take the row): logged, deleted, the next ones published."""
    broker = SwitchableBroker(memory_broker)
    real_publish = broker.publish

    def publish(channel, event_type, data, **kwargs):
        if data == '"poison"':
            raise InvalidEvent("this broker cannot store it")
        return real_publish(channel, event_type, data, **kwargs)

    broker.publish = publish
    for data in ("a", "poison", "b"):
        send_event("room:a", "note", data, durable=True)
    with caplog.at_level(logging.ERROR, logger="myapp.outbox"):
        relay = relays(PostgresSource("default"), get_broker=lambda: broker)
        wait_until(lambda: relay.published == 3, what="three rows handled")
    assert [data for _, data in history("room:a")] == ['"a"', '"b"']
    assert "refuses outbox row" in caplog.text and "dropping it" in caplog.text


def test_raw_data_with_nul_is_relayed_byte_exact(memory_broker, relays):
    """Raw data a text column cannot hold (NUL, U+FFFF) goes through the bytea column unchanged."""
    text = "a\x00b\uffff\r\nc"
    send_event("room:a", "note", text, raw=True, durable=True)
    relay = relays(PostgresSource("default"))
    wait_until(lambda: relay.published == 1, what="the event")
    assert history("room:a") == [("note", text)]


def test_relay_reconnects_after_losing_its_connection(memory_broker, relays, caplog):
    """The relay's session killed by the server: it reconnects, takes the lock again, and publishes."""
    relay = relays(PostgresSource("default"))
    wait_until(lambda: relay.active, what="the relay active")
    with caplog.at_level(logging.INFO, logger="myapp.outbox"):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = %s AND objid = %s",
                [1836674933, 1952608120],  # as docs/outbox.md gives them
            )
            assert cursor.fetchone() == (True,), "the lock is visible in pg_locks under the documented key"
        send_event("room:a", "note", "after", durable=True)
        wait_until(lambda: history("room:a"), timeout=10, what="the event after the reconnect")
    assert "database unavailable" in caplog.text


# -- the relay on SQLite -----------------------------------------------------------

SQLITE_TABLE = (
    'CREATE TABLE "myapp_outbox_event" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, "channel" text NOT NULL, '
    '"event_type" text NOT NULL, "data" BLOB NOT NULL, "idempotency_key" text NOT NULL, "created" datetime NOT NULL)'
)


@pytest.fixture
def sqlite_alias(tmp_path, monkeypatch):
    """A SQLite database alias (WAL, as the demo configures it) holding an empty outbox table."""
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(SQLITE_TABLE)
    configured = connections.configure_settings(
        {**connections.settings, "outbox_sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}}
    )
    monkeypatch.setitem(connections.settings, "outbox_sqlite", configured["outbox_sqlite"])
    yield "outbox_sqlite", path
    del connections["outbox_sqlite"]


def sqlite_insert(path, rows):
    """Insert (channel, data) rows in one transaction, as a durable publish would."""
    with sqlite3.connect(path, timeout=20) as db:
        db.executemany(
            "INSERT INTO myapp_outbox_event (channel, event_type, data, idempotency_key, created) "
            "VALUES (?, 'note', ?, lower(hex(randomblob(16))), datetime('now'))",
            [(channel, data.encode()) for channel, data in rows],
        )


def test_sqlite_relays_publish_each_row_once_in_order(memory_broker, relays, sqlite_alias):
    """Two SQLite relays and a writer racing them: one is active (the lock file), every row once, in order."""
    alias, path = sqlite_alias
    pair = [relays(SQLiteSource(alias)), relays(SQLiteSource(alias))]
    for start in range(0, 600, 20):
        sqlite_insert(path, [(f"room:{n % 3}", str(n)) for n in range(start, start + 20)])
    wait_until(lambda: sum(relay.published for relay in pair) == 600, timeout=30, what="600 published")
    assert sorted(relay.active for relay in pair) == [False, True]
    for channel in range(3):
        assert [int(data) for _, data in history(f"room:{channel}")] == list(range(channel, 600, 3))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM myapp_outbox_event").fetchone() == (0,)


def test_sqlite_standby_takes_over_when_the_active_relay_stops(memory_broker, relays, sqlite_alias):
    """The lock file's flock is released with its holder: the standby becomes active and publishes."""
    alias, path = sqlite_alias
    first = relays(SQLiteSource(alias))
    wait_until(lambda: first.active, what="the first relay active")
    second = relays(SQLiteSource(alias))
    time.sleep(0.3)
    assert not second.active
    first.stop()
    wait_until(lambda: second.active, what="the standby takes over")
    sqlite_insert(path, [("room:a", "1")])
    wait_until(lambda: second.published == 1, what="the new active relay publishes")


def test_sqlite_relay_never_holds_the_write_lock_while_publishing(memory_broker, relays, sqlite_alias):
    """Another connection holding SQLite's write lock: the relay still publishes (once), and deletes once it is free.

    The relay reads without the lock and takes it only for the delete, so a
    writer never waits on a broker call (under gevent, that wait would block
    the whole worker).
    """
    alias, path = sqlite_alias
    sqlite_insert(path, [("room:a", "1")])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    relay = relays(SQLiteSource(alias))
    wait_until(lambda: history("room:a"), what="the event published while the lock is held")
    time.sleep(1.5)  # past DELETE_RETRY_SECONDS: the relay reads and publishes again, the broker delivers nothing
    assert history("room:a") == [("note", "1")] and relay.published == 0
    holder.execute("ROLLBACK")
    holder.close()
    wait_until(lambda: relay.published == 1, what="the delete once the lock is free")
    assert history("room:a") == [("note", "1")]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM myapp_outbox_event").fetchone() == (0,)


def test_sqlite_relay_picks_up_rows_within_the_poll_interval(memory_broker, relays, sqlite_alias):
    """Without NOTIFY, a new row is published within about one poll interval."""
    alias, path = sqlite_alias
    relay = relays(SQLiteSource(alias), poll_seconds=0.5)
    wait_until(lambda: relay.active, what="the relay connected")
    started = time.monotonic()
    sqlite_insert(path, [("room:a", "1")])
    wait_until(lambda: relay.published == 1, what="the event")
    assert time.monotonic() - started < 1.5


# -- checks ---------------------------------------------------------------------


def test_durable_setting_without_the_app_is_a_check_error(settings):
    """MYAPP_DURABLE_PUBLISH = True without myapp.outbox: myapp.E013 naming the app to add."""
    settings.MYAPP_DURABLE_PUBLISH = True
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "myapp.outbox"]
    (error,) = checks.check_outbox()
    assert error.id == "myapp.E013" and '"myapp.outbox"' in error.hint


@pytest.mark.parametrize(
    ("name", "value", "error_id"),
    [
        ("MYAPP_OUTBOX_DATABASES", ["nope"], "myapp.E014"),
        ("MYAPP_OUTBOX_DATABASES", [], "myapp.E014"),
        ("MYAPP_OUTBOX_POLL_SECONDS", 0, "myapp.E016"),
        ("MYAPP_OUTBOX_POLL_SECONDS", "1", "myapp.E016"),
    ],
    ids=["unknown alias", "no alias", "zero poll", "poll not a number"],
)
def test_bad_outbox_settings_are_check_errors(settings, name, value, error_id):
    """Outbox settings a relay cannot use are flagged at start-up."""
    setattr(settings, name, value)
    assert [error.id for error in checks.check_outbox()] == [error_id]


def test_outbox_settings_of_the_demo_pass_the_checks():
    """The demo's configuration (the app installed, PostgreSQL) raises nothing."""
    assert checks.check_outbox() == []


# -- under gevent ---------------------------------------------------------------------

GEVENT_SCRIPT = """
import json, os, time
import psycopg  # imported before patching, as a preloaded app would; PSYCOPG_WAIT_FUNC=wait_poll is set
from gevent import monkey
monkey.patch_all()
import gevent
import django
django.setup()
from django.db import transaction
from myapp.outbox import runner
from myapp.outbox.models import OutboxEvent
from myapp.publish import send_event

with transaction.atomic():
    for n in range(500):
        send_event(f"room:{n % 5}", "note", n, durable=True)
gaps = []
def ticker():
    last = time.monotonic()
    while True:
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now

writes = []
def writer():
    # Another greenlet of the same process writing (as a view would) while
    # the relay drains: with SQLite it must never find the write lock held
    # across a broker call.
    for n in range(100):
        began = time.monotonic()
        with transaction.atomic():
            send_event("room:writer", "note", n, durable=True)
        writes.append(time.monotonic() - began)
        gevent.sleep(0.005)

from myapp.outbox import sources
batches = [0]
for source_class in (sources.PostgresSource, sources.SQLiteSource):
    def counted(self, size, _batch=source_class.batch):
        batches[0] += 1
        return _batch(self, size)
    source_class.batch = counted

ticking = gevent.spawn(ticker)
relays = runner.start(poll_seconds=0.5)
started = time.monotonic()
writing = gevent.spawn(writer)
writing.join()
while OutboxEvent.objects.exists():
    gevent.sleep(0.05)
results = {"busy": max(gaps), "relayed_in": time.monotonic() - started, "slowest_write": max(writes)}
gaps.clear()
idle_from, cpu_from = batches[0], time.process_time()
gevent.sleep(1.5)  # the relay waits (NOTIFY or its poll)
results["idle_batches"] = batches[0] - idle_from
results["idle_cpu_s"] = time.process_time() - cpu_from
results["idle"] = max(gaps)
results["ticks"] = len(gaps)
relays.stop()
ticking.kill()
print(json.dumps(results))
"""


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_relay_under_gevent_never_blocks_other_greenlets(kind, tmp_path, valkey_server, postgres_server):
    """A relay greenlet publishing 600 rows while another greenlet writes, then waiting: a 10 ms ticker keeps going.

    Idle, the relay waits: a few looks at the outbox in 1.5 s, not a loop of queries.
    """
    import json
    import os
    import subprocess
    import sys

    from tests.stack import BASE

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "PSYCOPG_", "DATABASE_URL"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "MYAPP_VAR_DIR": str(tmp_path),
            "DJANGO_SECRET_KEY": "gevent-relay",
            "PSYCOPG_WAIT_FUNC": "wait_poll",  # as myapp.gunicorn sets it
        }
    )
    if kind == "postgres":
        # The test database itself (flushed after this test): PostgreSQL outbox and broker.
        env["DATABASE_URL"] = postgres_server.url(connection.settings_dict["NAME"])
        env["MYAPP_BROKER_BACKEND"] = "postgres"
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        env["REDIS_URL"] = valkey_server.url
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], env=env, cwd=BASE, check=True, timeout=120)
    completed = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT],
        env={**env, "PYTHONPATH": str(BASE)},
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    print(kind, results)
    assert results["busy"] < 0.1, results
    assert results["slowest_write"] < 0.1, results
    assert results["idle"] < 0.1, results
    assert results["ticks"] > 50, results
    # Idle, the relay looks at the outbox once per poll (0.5 s) or NOTIFY, and burns no CPU between.
    assert results["idle_batches"] <= 5, results
    assert results["idle_cpu_s"] < 0.3, results
