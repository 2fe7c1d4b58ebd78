"""The Redis broker under Sentinel: options, following a failover, and what replication lost.

The cluster tests run a primary, a replica and three Sentinels (the wheel's
``valkey-server``, ``--sentinel`` for the Sentinels) on loopback, and SIGKILL
the primary. Replication is asynchronous; to make the loss certain instead of
hoping for it, the test first cuts the replica off: the primary disables the
user the replica authenticates with and kills its replication link, so the
replica cannot come back, and every event the primary accepts from then on
is one the replica never gets. The Sentinels then promote that replica.

No process's clock can be changed here. A new primary whose clock is behind
the old one's is played by the old primary instead: after the cut, its
position stream jumps an hour ahead (``XADD ids <future>-0``, not
replicated), so the events it accepts before dying carry positions the new
primary's clock will not reach for an hour.
"""

import json
import threading
import time

import pytest
import requests

from myapp.brokers.base import Subscribed
from myapp.brokers.redis import RedisBroker
from myapp.events import Event
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from myapp.ids import format_id, parse
from scripts.servers import EmbeddedSentinel, EmbeddedValkey, free_port
from tests.conftest import wait_until
from tests.sse_client import SSEClient
from tests.stack import PUBLISH_TOKEN, LiveStack

SERVICE = "mymaster"
SECRET = "replication-secret"
#: The user the replica authenticates as; disabling it on the primary cuts replication for good.
REPLICATION_USER = ["--user", "replicator", "on", ">" + SECRET, "+@all", "~*", "&*"]
#: Seconds a publish may take to be refused while there is no primary.
REFUSAL_BOUND = 8


class Cluster:
    """A primary and its replica, watched by three Sentinels, on 127.0.0.1."""

    def __init__(self, directory, *, down_after_ms=1000, persist=False):
        self.primary = EmbeddedValkey(directory / "primary", port=free_port(), persist=persist, args=REPLICATION_USER)
        self.replica = EmbeddedValkey(
            directory / "replica",
            port=free_port(),
            persist=persist,
            replica_of=self.primary.port,
            args=[*REPLICATION_USER, "--masteruser", "replicator", "--masterauth", SECRET],
        )
        self.sentinels = [
            EmbeddedSentinel(
                directory / f"sentinel{index}",
                free_port(),
                self.primary.port,
                service_name=SERVICE,
                down_after_ms=down_after_ms,
            )
            for index in range(3)
        ]

    @property
    def addresses(self):
        """The ``sentinels`` option."""
        return [["127.0.0.1", sentinel.port] for sentinel in self.sentinels]

    @property
    def env(self):
        """The live stack's environment for this cluster (config/settings.py)."""
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels),
            "REDIS_SENTINEL_SERVICE": SERVICE,
        }

    def start(self):
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs the Sentinels to know the replica and each other
        # (they announce themselves every 2 s), and the replica in sync.
        wait_until(self._watched, timeout=30, interval=0.1, what="the Sentinels to know the replica and each other")
        return self

    def _watched(self):
        for sentinel in self.sentinels:
            master = sentinel.master()
            if master["num-slaves"] < 1 or master["num-other-sentinels"] < 2:
                return False
        return self.replica.client().info("replication")["master_link_status"] == "up"

    def replica_head(self, prefix="myapp:"):
        """The newest position the replica holds (int, 0 if none): it has every position up to it."""
        entries = self.replica.client().xrevrange(prefix + "ids", count=1)
        return parse(entries[0][0].decode()) if entries else 0

    def cut_replication(self, clock_ahead_ms=0, prefix="myapp:"):
        """From now on the primary accepts writes the replica never gets; its positions jump ``clock_ahead_ms``."""
        client = self.primary.client()
        client.execute_command("ACL", "SETUSER", "replicator", "off")
        client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        wait_until(lambda: client.info("replication")["connected_slaves"] == 0, what="the replica to be cut off")
        if clock_ahead_ms:
            seconds, microseconds = client.time()
            ahead = seconds * 1000 + microseconds // 1000 + clock_ahead_ms
            client.xadd(prefix + "ids", {"p": ""}, id=f"{ahead}-0", maxlen=1)

    def fail_primary(self):
        """SIGKILL the primary; return the time.monotonic() of the kill."""
        self.primary.kill()
        return time.monotonic()

    def promoted(self):
        """True once every Sentinel names the replica as the primary and it acts as one."""
        address = ("127.0.0.1", self.replica.port)
        if any(sentinel.master_address() != address for sentinel in self.sentinels):
            return False
        return self.replica.client().info("replication")["role"] == "master"

    def stop(self):
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path / "redis")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# -- options (no server) --------------------------------------------------------

SENTINELS = [["127.0.0.1", 26379]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sentinels": "127.0.0.1:26379"}, "non-empty list of \\[host, port\\] pairs"),
        ({"sentinels": []}, "non-empty list of \\[host, port\\] pairs"),
        ({"sentinels": [["127.0.0.1"]]}, "\\['127.0.0.1'\\] is not one"),
        ({"sentinels": [["127.0.0.1", "26379"]]}, "is not one"),
        ({"sentinels": [["127.0.0.1", True]]}, "is not one"),
        ({"sentinels": [["127.0.0.1", 70000]]}, "is not one"),
        ({"sentinels": [["", 26379]]}, "is not one"),
        ({"sentinels": SENTINELS, "service_name": ""}, "sentinel monitor <name>"),
        ({"sentinels": SENTINELS, "service_name": 7}, "service_name must be a str"),
        ({"sentinels": SENTINELS, "sentinel_kwargs": "secret"}, "sentinel_kwargs must be a dict"),
        ({"sentinels": SENTINELS, "sentinel_kwargs": {"pasword": "x"}}, "sentinel_kwargs do not fit"),
        ({"sentinels": SENTINELS, "url": "unix:///run/redis.sock"}, "Sentinel gives the primary as host and port"),
        ({"sentinels": SENTINELS, "url": "http://x"}, "not a redis-py URL"),
    ],
)
def test_bad_sentinel_options_fail_at_start_up_with_the_fix(options, message):
    """Each malformed Sentinel option raises BrokerConfigurationError saying what to write instead."""
    with pytest.raises(BrokerConfigurationError, match=message):
        RedisBroker(**options)


def test_url_gives_the_primary_its_database_credentials_and_tls():
    """With sentinels, the url's database, username, password and TLS reach the primary; its host is ignored."""
    broker = RedisBroker(url="rediss://app:s3cret@ignored.example:1234/3", sentinels=SENTINELS)
    kwargs = broker._pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "s3cret")
    assert "host" not in kwargs and "port" not in kwargs
    assert broker._pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    plain = RedisBroker(url="redis:///0", sentinels=SENTINELS)
    assert plain._pool.connection_class.__name__ == "SentinelManagedConnection"


def test_without_any_sentinel_answering_calls_fail_fast():
    """The constructor does no I/O; with no Sentinel up, publish and listener raise BrokerUnavailable at once."""
    broker = RedisBroker(url="redis:///0", sentinels=[["127.0.0.1", free_port()]], connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="No master found for 'mymaster'"):
        broker.publish("room:a", "t", "x")
    with pytest.raises(BrokerUnavailable, match="No master found"):
        broker.listener("!hub:test")
    assert time.monotonic() - started < 2
    broker.close()


# -- the broker through a failover ----------------------------------------------


class Collector:
    """Reads a listener: its confirmations and its events."""

    def __init__(self, listener, *channels):
        self.listener = listener
        self.events = []
        listener.subscribe(list(channels))
        confirmed = set()

        def subscribed():
            confirmed.update(item.channel for item in listener.wait(0.05) if type(item) is Subscribed)
            return set(channels) <= confirmed

        wait_until(subscribed, what=f"confirmation of {channels}")

    def wait_events(self, count):
        def enough():
            self.events += [item for item in self.listener.wait(0.05) if type(item) is Event]
            return len(self.events) >= count

        wait_until(enough, what=f"{count} events")
        return self.events


def _publish_when_possible(broker, data, refusals, deadline=30.0):
    """Publish, retrying BrokerUnavailable; record how long each refusal took in ``refusals``; return the position."""
    limit = time.monotonic() + deadline
    while True:
        started = time.monotonic()
        try:
            return broker.publish("room:a", "t", data)
        except BrokerUnavailable:
            refusals.append(time.monotonic() - started)
            assert time.monotonic() < limit, "no primary came back"
            time.sleep(0.02)


@pytest.mark.e2e
def test_broker_follows_a_failover_and_what_replication_lost_counts_as_trimmed(cluster):
    """After the primary dies the broker publishes on the new one; positions it never got, and older ones, reset."""
    broker = RedisBroker(url="redis:///0", sentinels=cluster.addresses, key_prefix="t:")
    collector = Collector(broker.listener("!hub:test"), "room:a")
    kept = [broker.publish("room:a", "t", f"kept-{n}") for n in range(3)]
    wait_until(lambda: cluster.replica_head("t:") >= kept[-1], what="the replica to have the first events")
    cluster.cut_replication(prefix="t:")
    lost = [broker.publish("room:a", "t", f"lost-{n}") for n in range(3)]
    assert [event.pos for event in collector.wait_events(6)] == kept + lost, "a listener (a hub) delivered them all"
    head = cluster.replica_head("t:")
    assert head < lost[0], "the replica never got the lost events"

    killed_at = cluster.fail_primary()
    refusals = []
    after = _publish_when_possible(broker, "after", refusals)
    published_in = time.monotonic() - killed_at
    assert refusals, "a publish was refused while no primary was elected"
    assert max(refusals) < REFUSAL_BOUND
    wait_until(cluster.promoted, what="every Sentinel to name the new primary")
    with pytest.raises(BrokerUnavailable):
        while True:
            collector.listener.wait(1.0)  # the old primary's connection is gone
    collector.listener.close()
    again = Collector(broker.listener("!hub:test"), "room:a")
    second = broker.publish("room:a", "t", "second")
    assert [event.pos for event in again.wait_events(1)] == [second], "a new listener reaches the new primary"
    again.listener.close()

    assert after > head and after > max(lost), "positions go on above everything, here with one clock"
    for resume in (lost[0], kept[-1]):
        history = broker.history(["room:a"], resume)
        assert history.trimmed == frozenset({"room:a"}), f"resuming from {format_id(resume)} would skip lost events"
        assert [event.data for event in history.events] == ["after", "second"]
    epoch = history.epoch
    assert head < epoch < after
    assert broker.history(["room:a"], epoch).trimmed == frozenset(), "ids of the new primary resume"
    other = RedisBroker(url="redis:///0", sentinels=cluster.addresses, key_prefix="t:")
    assert other.history(["room:a"], after).epoch == epoch, "another process's first connection starts no epoch"
    print(f"broker: publishing again {published_in:.2f} s after the kill; {len(refusals)} refusals")
    other.close()
    broker.close()


@pytest.mark.e2e
def test_planned_failover_moves_publishers_and_listeners_and_resets_once(cluster):
    """SENTINEL FAILOVER ... COORDINATED: publishing pauses briefly, nothing is lost, and streams reset once."""
    broker = RedisBroker(url="redis:///0", sentinels=cluster.addresses, key_prefix="t:", history_length=100_000)
    collector = Collector(broker.listener("!hub:test"), "room:a")
    first = broker.publish("room:a", "t", "first")
    collector.wait_events(1)
    cluster.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE, "COORDINATED")
    started = time.monotonic()
    refusals = []
    accepted = [first]
    with pytest.raises(BrokerUnavailable):
        while time.monotonic() - started < 30:
            accepted.append(_publish_when_possible(broker, "during", refusals))
            collector.listener.wait(0.01)  # the demoted primary closes its clients' connections
    wait_until(cluster.promoted, what="every Sentinel to name the new primary")
    collector.listener.close()
    again = Collector(broker.listener("!hub:test"), "room:a")
    after = _publish_when_possible(broker, "after", refusals)
    assert [event.pos for event in again.wait_events(1)] == [after]
    again.listener.close()
    history = broker.history(["room:a"], first)
    assert history.trimmed == frozenset({"room:a"}), "the new primary cannot tell it has everything: reset once"
    assert first < history.epoch < after
    retained = {event.pos for event in history.events}
    assert set(accepted[1:]) <= retained, "the replica had caught up: every accepted event is on the new primary"
    print(f"planned failover: {len(refusals)} publishes refused, the slowest in {max(refusals, default=0):.3f} s")
    broker.close()


@pytest.fixture
def patient_cluster(tmp_path):
    """A cluster whose Sentinels wait 5 s before they call the primary down, and whose servers persist."""
    cluster = Cluster(tmp_path / "redis", down_after_ms=5000, persist=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.mark.e2e
def test_primary_restarted_in_place_keeps_the_history(patient_cluster):
    """A primary restarted with its data, before any failover, keeps its epoch: resuming streams lose nothing."""
    cluster = patient_cluster
    broker = RedisBroker(url="redis:///0", sentinels=cluster.addresses, key_prefix="t:")
    first = broker.publish("room:a", "t", "a")
    broker.publish("room:a", "t", "b")
    epoch = broker.history(["room:a"], first).epoch
    cluster.primary.restart()
    third = _publish_when_possible(broker, "c", [])
    history = broker.history(["room:a"], first)
    assert (history.epoch, history.trimmed) == (epoch, frozenset())
    assert [event.data for event in history.events] == ["b", "c"]
    assert cluster.sentinels[0].master_address() == ("127.0.0.1", cluster.primary.port)
    assert third > first
    broker.close()


# -- the live stack through a failover ------------------------------------------

CHANNEL = "room:flow"


class Publisher(threading.Thread):
    """Publishes ``{"n": 0}``, ``{"n": 1}`` ... through the API, one after another, retrying each 503."""

    def __init__(self, stack, pause=0.01):
        super().__init__(daemon=True)
        self.stack = stack
        self.pause = pause  # seconds between two publishes
        self.accepted = []  # (n, id, started, answered): time.monotonic() of the request and its 200
        self.refused = []  # seconds each 503 took
        self.unexpected = []
        self._halt = threading.Event()

    def run(self):
        session = requests.Session()
        n = 0
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                response = session.post(
                    self.stack.url + "/api/events/",
                    json={"channel": CHANNEL, "event_type": "note", "data": {"n": n}},
                    headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
                    timeout=15,
                )
            except requests.RequestException as error:
                self.unexpected.append(repr(error))
                continue
            answered = time.monotonic()
            if response.status_code == 200:
                self.accepted.append((n, response.json()["id"], started, answered))
                n += 1
            elif response.status_code == 503:
                self.refused.append(answered - started)
            else:
                self.unexpected.append(f"{response.status_code} {response.text}")
            self._halt.wait(self.pause)

    def since(self, moment):
        """The events whose publish started after ``moment`` (time.monotonic()) and was accepted."""
        return [entry for entry in list(self.accepted) if entry[2] > moment]

    def stop(self):
        self._halt.set()
        self.join(20)


class Browser:
    """One page's stream: like a browser, it reconnects with its Last-Event-ID whenever a response ends."""

    def __init__(self, session, url):
        self.session = session
        self.url = url
        self.clients = [SSEClient(session, url)]
        self.clients[0].wait_count("stream.open", 1)

    def messages(self):
        """Every message received so far, over every connection, in arrival order."""
        current = self.clients[-1]
        if current.ended.is_set():
            self.clients.append(SSEClient(self.session, self.url, last_event_id=current.last_event_id))
        return [message for client in self.clients for message in list(client.messages)]

    def notes(self):
        return [json.loads(message.data)["n"] for message in self.messages() if message.type == "note"]

    def close(self):
        for client in self.clients:
            client.close()


def _check_each_event_arrived_or_was_reset(accepted, received):
    """Every accepted event arrived, or a stream.reset came after the events published before it and before later ones.

    The rule of tests/test_faults.py::test_outage_longer_than_the_history_resets_before_the_hole, in publish
    order (one publisher, so ``n`` is that order; with a new primary whose clock is behind, positions are not).
    """
    arrived = {}
    for index, message in enumerate(received):
        if message.type == "note":
            arrived.setdefault(json.loads(message.data)["n"], index)
    resets = [index for index, message in enumerate(received) if message.type == "stream.reset"]
    for n, event_id, _, _ in accepted:
        if n in arrived:
            continue
        before = [index for m, index in arrived.items() if m < n]
        later = [index for m, index in arrived.items() if m > n]
        covering = [i for i in resets if (not before or i > max(before)) and (not later or i < min(later))]
        assert covering, f"event n={n} ({event_id}) was accepted, never arrived, and no stream.reset covers it"


@pytest.mark.e2e
@pytest.mark.parametrize("old_clock_ahead_ms", [0, 3_600_000], ids=["same-clock", "new-primary-clock-behind"])
def test_failover_while_events_flow(cluster, tmp_path, old_clock_ahead_ms):
    """The primary dies while events flow: streams go on, lost events are reset, resuming clients reset, never skip."""
    stack = LiveStack(tmp_path / "stack", mode="redis", redis_url="redis:///0", workers=1, env=cluster.env)
    with stack:
        session = stack.login("alice")
        url = stack.url + "/events/?channel=" + CHANNEL
        live = Browser(session, url)
        early = SSEClient(session, url)  # leaves before the cut: its id is on the replica
        away = SSEClient(session, url)  # leaves after receiving events the replica never got
        for client in (early, away):
            client.wait_count("stream.open", 1)
        publisher = Publisher(stack)
        publisher.start()
        try:
            early.wait_count("note", 10, timeout=20)
            early.close()
            wait_until(lambda: cluster.replica_head() >= parse(early.last_event_id), what="replication")
            cut_at = time.monotonic()
            cluster.cut_replication(old_clock_ahead_ms)
            wait_until(lambda: len(publisher.since(cut_at)) >= 5, timeout=20, what="events after the cut")
            unreplicated = {entry[1] for entry in publisher.since(cut_at)}
            wait_until(
                lambda: any(m.last_event_id in unreplicated for m in away.of_type("note")),
                what="the away client to receive an event the replica never got",
            )
            away.close()
            seen = len(publisher.accepted)
            wait_until(lambda: len(publisher.accepted) >= seen + 5, what="more events the away client misses")
            head = cluster.replica_head()  # the newest position the new primary will have

            killed_at = cluster.fail_primary()
            back = {}

            def recovered():
                after = publisher.since(killed_at)
                if after and "publish" not in back:
                    back["publish"] = after[0][3] - killed_at
                if after and "stream" not in back and any(n >= after[0][0] for n in live.notes()):
                    back["stream"] = time.monotonic() - killed_at
                return len(back) == 2 and len(after) >= 20

            wait_until(recovered, timeout=60, interval=0.01, what="publishing and the live stream after the failover")
        finally:
            publisher.stop()
        assert publisher.unexpected == []
        wait_until(cluster.promoted, what="every Sentinel to name the new primary")
        accepted = list(publisher.accepted)
        last_n = accepted[-1][0]
        wait_until(lambda: any(n >= last_n for n in live.notes()), timeout=20, what="the last event on the live stream")
        received = live.messages()

        new_primary = cluster.replica.client()
        retained = {raw.decode() for raw, _ in new_primary.xrange("myapp:h:" + CHANNEL)}
        lost = [entry for entry in accepted if entry[1] not in retained and entry[2] < killed_at]
        assert lost, "the cut made the old primary accept events the new one never got"
        assert all(entry[2] > cut_at for entry in lost), "only events after the cut were lost"

        # Open streams go on, and the page hears that its state holds events the broker no longer has.
        failover_n = publisher.since(killed_at)[0][0]
        resets = [index for index, m in enumerate(received) if m.type == "stream.reset"]
        first_after = min(
            i for i, m in enumerate(received) if m.type == "note" and json.loads(m.data)["n"] >= failover_n
        )
        assert any(index < first_after for index in resets), "a stream.reset came before the first event after it"
        _check_each_event_arrived_or_was_reset(accepted, received)

        # Positions after the failover: above every position the new primary had, and increasing.
        after = [parse(entry[1]) for entry in accepted if entry[2] > killed_at]
        assert min(after) > head
        assert after == sorted(after) and len(set(after)) == len(after)
        before = [parse(entry[1]) for entry in accepted if entry[3] < killed_at]
        if not old_clock_ahead_ms:
            assert min(after) > max(before), "with one clock, positions never go backwards across the failover"
        else:
            assert min(after) < max(before), "the new primary's positions are behind the old one's (the simulation)"

        # Clients that were away across the failover reset instead of resuming past the lost events.
        expected = {early: "trimmed", away: "unknown" if old_clock_ahead_ms else "trimmed"}
        for client, reason in expected.items():
            resumed = SSEClient(session, url, last_event_id=client.last_event_id)
            try:
                (first,) = resumed.wait_count("stream.reset", 1)
                assert resumed.messages[0] is first, "the reset is the first thing the resuming client hears"
                assert json.loads(first.data) == {"reason": reason}
                assert stack.publish(CHANNEL, {"n": "next"}).status_code == 200
                resumed.wait_count("note", 1)
                assert [json.loads(m.data) for m in resumed.messages if m.type == "note"] == [{"n": "next"}]
            finally:
                resumed.close()
        live.close()

        refused = publisher.refused
        print(
            f"failover ({'clock behind' if old_clock_ahead_ms else 'one clock'}): publishing again "
            f"{back['publish']:.2f} s after the kill, the live stream receiving again {back['stream']:.2f} s after; "
            f"{len(refused)} publishes refused (slowest {max(refused, default=0):.3f} s); {len(lost)} events lost "
            f"to replication, {len(resets)} stream.reset on the live stream"
        )
        assert max(refused, default=0) < REFUSAL_BOUND
        log = stack.tail(50000)
        assert "a new epoch starts at" in log
