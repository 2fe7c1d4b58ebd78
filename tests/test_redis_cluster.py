"""The Redis Cluster broker: options, partitions, one connection per node, a slot migration and a failover
while events flow, and the live stack on a cluster.

The contract suite (tests/test_brokers.py) runs over this backend too. The
cluster here is 3 Valkey primaries (scripts/servers ``ValkeyCluster``);
the failover test adds a replica each and, as tests/test_sentinel.py does,
cuts one replica off before its primary dies so the loss is certain.
"""

import json
import threading
import time
import zlib

import pytest
from redis.crc import key_slot

from myapp.brokers.base import Subscribed
from myapp.brokers.redis_cluster import RedisClusterBroker
from myapp.brokers.redis_cluster.partitions import SLOTS, partition_of, tags
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from myapp.ids import milliseconds, parse, parse_ids
from scripts.servers import ValkeyCluster, free_port
from tests.conftest import wait_until
from tests.sse_client import SSEClient, parse_all
from tests.stack import LiveStack

# -- options and partitions (no server) -----------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give the cluster as url"),
        ({"url": "unix:///run/redis.sock"}, "unix socket"),
        ({"url": "redis://127.0.0.1:7000/3"}, "only database 0"),
        ({"url": "http://x"}, "not a redis-py URL"),
        ({"startup_nodes": "127.0.0.1:7000"}, "startup_nodes must be a non-empty list"),
        ({"startup_nodes": [["127.0.0.1", "7000"]]}, "is not one"),
        ({"url": "redis://h:1", "partitions": 0}, "partitions must be an int >= 1"),
        ({"url": "redis://h:1", "partitions": 257}, "at most 256"),
        ({"url": "redis://h:1", "key_prefix": "a{b}:"}, "must not contain braces"),
        ({"url": "redis://h:1", "history_length": 0}, "history_length must be an int >= 1"),
    ],
)
def test_bad_cluster_options_fail_at_start_up_with_the_fix(options, message):
    """Each malformed option raises BrokerConfigurationError saying what to write instead."""
    with pytest.raises(BrokerConfigurationError, match=message):
        RedisClusterBroker(**options)


def test_without_any_node_answering_calls_fail_fast():
    """The constructor does no I/O; with no node up, publish and listener raise BrokerUnavailable at once."""
    broker = RedisClusterBroker(startup_nodes=[["127.0.0.1", free_port()]], connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        broker.publish("room:a", "t", "x")
    with pytest.raises(BrokerUnavailable):
        broker.listener("!hub:test")
    assert time.monotonic() - started < 5
    broker.close()


def test_channels_hash_into_partitions_with_crc32():
    """A channel's partition is zlib.crc32 of its UTF-8 name modulo the partition count (docs/brokers.md)."""
    for channel in ("room:a", "room:b", "ünï:cödé", "x" * 200):
        assert partition_of(channel, 16) == zlib.crc32(channel.encode()) % 16
    assert partition_of("room:a", 16) != partition_of("room:b", 16)


@pytest.mark.parametrize("partitions", [3, 16, 64, 128])
def test_partitions_spread_evenly_over_three_equal_nodes(partitions):
    """Each partition's tag lands in its own equal share of the slots, so three nodes hold a third each."""
    found, slots = tags(partitions)
    assert len(set(found)) == partitions
    per_node = [sum(1 for slot in slots if node * SLOTS // 3 <= slot < (node + 1) * SLOTS // 3) for node in range(3)]
    assert max(per_node) - min(per_node) <= 1, per_node
    broker = RedisClusterBroker(url="redis://127.0.0.1:7000", partitions=partitions)
    for part, base in enumerate(broker.bases):
        for suffix in ("ids", "epoch", "h:room:a", "k:room:a key", "c:room:a"):
            assert key_slot((base + suffix).encode()) == slots[part], "one slot per partition"


# -- on the session's cluster ----------------------------------------------------


def _subscribed(listener, channels):
    confirmed = set()

    def done():
        confirmed.update(i.channel for i in listener.wait(0.05) if type(i) is Subscribed)
        return set(channels) <= confirmed

    wait_until(done, what=f"confirmation of {len(channels)} channels")


def test_one_subscriber_connection_per_node_whatever_the_channels(redis_cluster_broker, valkey_cluster):
    """A listener holds one connection per primary, whose shard subscriptions cover every channel it asked for."""
    broker = redis_cluster_broker
    listener = broker.listener("!hub:connections")
    try:
        channels = [f"room:many-{n}" for n in range(300)]
        listener.subscribe(channels)
        _subscribed(listener, channels)
        ours = {node.sock.getsockname()[1] for node in listener._nodes.values()}
        mine = [
            [c for c in node.client().client_list() if int(c["addr"].rpartition(":")[2]) in ours]
            for node in valkey_cluster.primaries
        ]
        assert [len(clients) for clients in mine] == [1, 1, 1], "one connection per node, not per channel"
        shard_subscriptions = sum(int(c["ssub"]) for clients in mine for c in clients)
        assert shard_subscriptions == len(channels) + broker.partitions, "each channel, and the hub's per partition"
    finally:
        listener.close()


def _server_ms(client):
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def test_a_partition_that_lost_its_data_resets_its_channels_only(redis_cluster_broker, valkey_cluster):
    """A partition whose keys are gone starts an epoch of its own: its channels count as trimmed, others resume."""
    broker = redis_cluster_broker
    lossy, safe = "room:a", "room:b"
    part = broker.partition(lossy)
    seen = {lossy: broker.publish(lossy, "t", "lost"), safe: broker.publish(safe, "t", "kept")}
    node = valkey_cluster.owner(broker.slots[part]).client()
    keys = list(node.scan_iter(match=broker.bases[part] + "*"))
    assert keys
    node.delete(*keys)  # as a restart without persistence does, to this partition only
    wait_until(lambda: _server_ms(node) > milliseconds(seen[lossy]), what="the server clock to move on")
    after = broker.publish(lossy, "t", "new")
    broker.publish(safe, "t", "more")
    starts = broker.heads()
    starts[part], starts[broker.partition(safe)] = seen[lossy], seen[safe]
    history = broker.history([lossy, safe], starts)
    assert history.trimmed == frozenset({lossy}), "only the partition that lost its data"
    assert seen[lossy] < history.epoch[part] < after
    assert [e.data for e in history.events if e.channel == safe] == ["more"]


@pytest.mark.parametrize(
    ("channels", "last_event_id"),
    [
        (("room:a", "room:b"), "garbage"),
        (("room:a", "room:b"), "1763726400000-0"),
        (("room:a", "room:b"), "4:1763726400000-0,5:1763726400000-0"),
        (("room:a",), "4:1763726400000-0,14:1763726400000-0"),
    ],
    ids=["garbage", "plain id on two partitions", "other partitions", "multi-partition id on one"],
)
def test_ids_that_do_not_fit_the_stream_reset_as_malformed(redis_cluster_broker, hub_factory, channels, last_event_id):
    """An id of the wrong shape for the stream's partitions starts it with stream.reset (malformed), never an error."""
    hub = hub_factory(redis_cluster_broker)
    subscription = hub.subscribe(channels, last_event_id=last_event_id)
    assert subscription.reset == "malformed"
    subscription.close()


class Publisher(threading.Thread):
    """Publishes ``"0"``, ``"1"``, ... round-robin on ``channels``, retrying what the cluster refuses meanwhile."""

    def __init__(self, broker, channels, pause=0.005):
        super().__init__(daemon=True)
        self.broker = broker
        self.channels = channels
        self.pause = pause  # seconds between two publishes
        self.accepted = []  # (n, channel, position, time.monotonic() when the publish started)
        self.refused = 0
        self._halt = threading.Event()

    def run(self):
        n = 0
        while not self._halt.is_set():
            channel = self.channels[n % len(self.channels)]
            started = time.monotonic()
            try:
                pos = self.broker.publish(channel, "note", json.dumps({"n": n}))
            except BrokerUnavailable:
                self.refused += 1
                self._halt.wait(0.05)
                continue
            self.accepted.append((n, channel, pos, started))
            n += 1
            self._halt.wait(self.pause)

    def attempts(self):
        return len(self.accepted) + self.refused

    def wait_attempts(self, count, timeout=30):
        """Wait until ``count`` more publishes were accepted or refused."""
        target = self.attempts() + count
        wait_until(lambda: self.attempts() >= target, timeout, what=f"{count} more publish attempts")

    def wait_more(self, count, timeout=30):
        target = len(self.accepted) + count
        wait_until(lambda: len(self.accepted) >= target, timeout, what=f"{count} more accepted publishes")

    def stop(self):
        self._halt.set()
        self.join(20)


class Reader(threading.Thread):
    """Collects what one subscription hands over, as the stream would write it."""

    def __init__(self, subscription):
        super().__init__(daemon=True)
        self.subscription = subscription
        self.first = subscription.start_id
        self.wire = b""
        self.start()

    def run(self):
        while self.subscription.closed is None:
            _, frames = self.subscription.get(0.2)
            self.wire += b"".join(frames)

    def messages(self):
        return parse_all(self.wire)

    def notes(self):
        return [json.loads(m.data)["n"] for m in self.messages() if m.type == "note"]


def _expected(publisher, channels):
    return [n for n, channel, _, _ in publisher.accepted if channel in channels]


@pytest.mark.e2e
def test_slot_migration_while_events_flow_loses_and_repeats_nothing(redis_cluster_broker, valkey_cluster, hub_factory):
    """A partition's slot moves to another node while events flow: open streams get every event once, no reset."""
    broker = redis_cluster_broker
    hub = hub_factory(broker)
    moving, staying = "room:a", "room:b"
    slot = broker.slots[broker.partition(moving)]
    assert broker.partition(moving) != broker.partition(staying)
    single = Reader(hub.subscribe([moving]))
    multi = Reader(hub.subscribe([moving, staying]))
    publisher = Publisher(broker, [moving, staying])
    publisher.start()
    try:
        publisher.wait_more(20)
        source = valkey_cluster.owner(slot)
        target = next(node for node in valkey_cluster.primaries if node is not source)
        # Half moved, a publish whose keys are on both nodes gets TRYAGAIN (redis-py retries, then it is refused).
        valkey_cluster.migrate(slot, target, between=lambda: publisher.wait_attempts(3))
        assert valkey_cluster.owner(slot) is target
        publisher.wait_more(40)
    finally:
        publisher.stop()
    last = _expected(publisher, [moving])[-1]
    wait_until(lambda: last in single.notes() and publisher.accepted[-1][0] in multi.notes(), timeout=20,
               what="the last events on both streams")  # fmt: skip
    assert single.notes() == _expected(publisher, [moving]), "every event of the moved partition, once, in order"
    assert sorted(multi.notes()) == _expected(publisher, [moving, staying]), "every event of both partitions, once"
    for channel in (moving, staying):
        of_channel = set(_expected(publisher, [channel]))
        assert [n for n in multi.notes() if n in of_channel] == sorted(of_channel), "in order per channel"
    for reader in (single, multi):
        assert not [m for m in reader.messages() if m.type == "stream.reset"], "a migration loses nothing"
    ids = [parse_ids(m.last_event_id) for m in multi.messages() if m.type == "note"]
    assert all(len(positions) == 2 for positions in ids), "the multi-partition stream's ids carry both partitions"
    # A stream resuming from the last id it got, on the moved slot, hears nothing old and nothing twice.
    resumed = Reader(hub.subscribe([moving, staying], last_event_id=multi.messages()[-1].last_event_id))
    broker.publish(moving, "note", json.dumps({"n": "after"}))
    wait_until(lambda: "after" in resumed.notes(), what="the resumed stream to go on live")
    assert resumed.notes() == ["after"]
    print(f"migration: {publisher.refused} publishes refused while the slot moved; {len(publisher.accepted)} accepted")


# -- a primary dies ----------------------------------------------------------------

SECRET = "replication-secret"
REPLICATION_USER = ["--user", "replicator", "on", ">" + SECRET, "+@all", "~*", "&*"]


@pytest.fixture
def failover_cluster(tmp_path):
    """3 primaries with a replica each; a replica takes over one second after its primary stops answering."""
    cluster = ValkeyCluster(
        tmp_path / "cluster",
        replicas=1,
        node_timeout_ms=1000,
        args=REPLICATION_USER,
        replica_args=["--masteruser", "replicator", "--masterauth", SECRET],
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _replica_head(replica, base):
    """The newest position of a partition (its keys start with ``base``) that ``replica`` holds (int, 0 if none)."""
    with replica.client().pipeline(transaction=False) as pipe:
        pipe.execute_command("READONLY")  # a replica redirects reads (MOVED) unless the connection says so
        pipe.xrevrange(base + "ids", count=1)
        _, found = pipe.execute()
    return parse(found[0][0].decode()) if found else 0


def _cut_replication(primary):
    """From now on ``primary`` accepts writes its replica never gets."""
    client = primary.client()
    client.execute_command("ACL", "SETUSER", "replicator", "off")
    client.execute_command("CLIENT", "KILL", "TYPE", "replica")
    wait_until(lambda: client.info("replication")["connected_slaves"] == 0, what="the replica to be cut off")


def _n(message):
    return json.loads(message.data)["n"]


def _arrived_or_reset(accepted, messages):
    """Each accepted event arrived once, or a stream.reset came after the events before it and before later ones."""
    arrived = {}
    for index, message in enumerate(messages):
        if message.type == "note":
            n = _n(message)
            assert n not in arrived, f"event n={n} arrived twice"
            arrived[n] = index
    resets = [index for index, message in enumerate(messages) if message.type == "stream.reset"]
    for n in accepted:
        if n in arrived:
            continue
        before = [index for m, index in arrived.items() if m < n]
        later = [index for m, index in arrived.items() if m > n]
        covering = [i for i in resets if (not before or i > max(before)) and (not later or i < min(later))]
        assert covering, f"event n={n} was accepted, never arrived, and no stream.reset covers it"


@pytest.mark.e2e
def test_primary_killed_while_events_flow_resets_what_was_lost_and_never_skips(failover_cluster, hub_factory):
    """A primary dies with events its replica never got: open streams reset before going on, resuming ones reset."""
    cluster = failover_cluster
    broker = RedisClusterBroker(startup_nodes=cluster.startup_nodes, key_prefix="t:", connect_timeout=0.5)
    hub = hub_factory(broker, subscribe_timeout=10.0)
    channel, elsewhere = "room:a", "room:b"
    part = broker.partition(channel)
    slot = broker.slots[part]
    primary = cluster.owner(slot)
    replica = cluster.replicas[cluster.primaries.index(primary)]
    live = Reader(hub.subscribe([channel]))
    both = Reader(hub.subscribe([channel, elsewhere]))
    publisher = Publisher(broker, [channel, elsewhere])
    publisher.start()
    try:
        publisher.wait_more(20)
        wait_until(lambda: live.notes(), what="the live stream to receive")
        early = live.messages()[-1].last_event_id  # replicated below: the new primary has it
        base = broker.bases[part]
        wait_until(lambda: _replica_head(replica, base) >= parse(early), what="the replica to have the early events")
        _cut_replication(primary)
        publisher.wait_more(10)  # accepted by the primary only: lost with it
        wait_until(lambda: publisher.accepted[-1][0] in both.notes(), what="the streams to receive the lost ones")
        killed_at = time.monotonic()
        primary.kill()
        wait_until(lambda: cluster.owner(slot) is replica, timeout=30, interval=0.1, what="the replica to take over")
        wait_until(lambda: any(entry[3] > killed_at for entry in publisher.accepted), timeout=30,
                   what="publishing again")  # fmt: skip
        publisher.wait_more(20)
    finally:
        publisher.stop()
    accepted = _expected(publisher, [channel])

    def reset(reader):
        return any(m.type == "stream.reset" for m in reader.messages())

    # The reset covers what the new primary had when the hub came back (events up to
    # its position are in the history the page reloads); later events reach the streams.
    wait_until(lambda: reset(live) and reset(both), timeout=30, what="the open streams to hear of the loss")
    streams_back = time.monotonic() - killed_at
    publishing_back = min(e[3] for e in publisher.accepted if e[3] > killed_at and e[1] == channel) - killed_at
    for name in (channel, elsewhere):
        broker.publish(name, "note", json.dumps({"n": "final"}))
    wait_until(lambda: "final" in live.notes() and both.notes().count("final") == 2, what="events after the reset")
    retained = {json.loads(fields[b"d"])["n"] for _, fields in replica.client().xrange(base + "h:" + channel)}
    lost = [n for n in accepted if n not in retained]
    assert lost, "the cut made the old primary accept events the new one never got"
    for reader in (live, both):
        messages = reader.messages()
        assert [m for m in messages if m.type == "stream.reset"], "the open stream heard of the loss"
        for name in {channel} if reader is live else {channel, elsewhere}:
            # Partitions interleave by arrival: the rule holds per channel, in publish order.
            expected = _expected(publisher, [name])
            mine = set(expected)
            kept = [m for m in messages if m.type == "stream.reset" or (m.type == "note" and _n(m) in mine)]
            _arrived_or_reset(expected, kept)
    assert not [m for m in both.messages() if m.type == "stream.reset" and "," not in m.last_event_id]
    # A stream resuming from an id of before the loss resets instead of skipping what was lost.
    resumed = Reader(hub.subscribe([channel], last_event_id=early))
    assert resumed.subscription.reset == "trimmed"
    resumed.subscription.close()
    print(
        f"failover: publishing on the partition again {publishing_back:.2f} s after the kill, streams reset by "
        f"{streams_back:.2f} s; {publisher.refused} publishes refused; {len(lost)} events lost to replication"
    )


# -- the live stack ------------------------------------------------------------------


@pytest.mark.e2e
def test_live_stack_on_the_cluster_delivers_and_resumes_a_multi_partition_stream(valkey_cluster, tmp_path):
    """gunicorn on the cluster broker: a stream over two partitions receives, and resumes from its one id."""
    nodes = ",".join(f"127.0.0.1:{node.port}" for node in valkey_cluster.primaries)
    stack = LiveStack(tmp_path / "stack", mode="redis", redis_url="redis://unused:1", workers=1, env={
        "MYAPP_BROKER_BACKEND": "redis_cluster", "REDIS_CLUSTER_NODES": nodes,
    })  # fmt: skip
    with stack:
        session = stack.login("alice")
        url = f"{stack.url}/events/?channel=room:a&channel=room:b"
        first = SSEClient(session, url)
        try:
            first.wait_count("stream.open", 1)
            for n, channel in enumerate(["room:a", "room:b"]):
                assert stack.publish(channel, {"n": n}).status_code == 200
            first.wait_count("note", 2)
            assert parse_ids(first.last_event_id) is not None, "one id carrying both partitions"
        finally:
            first.close()
        for n, channel in enumerate(["room:b", "room:a", "room:b"], start=2):
            assert stack.publish(channel, {"n": n}).status_code == 200
        second = SSEClient(session, url, last_event_id=first.last_event_id)
        try:
            second.wait_count("note", 3)
            assert sorted(json.loads(m.data)["n"] for m in second.of_type("note")) == [2, 3, 4]
            single = SSEClient(session, f"{stack.url}/events/?channel=room:a")
            single.wait_count("stream.open", 1)
            assert parse(single.last_event_id) is not None, "a single-channel stream's id stays <ms>-<seq>"
            single.close()
        finally:
            second.close()
