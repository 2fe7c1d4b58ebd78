"""Positions per partition (partitioned brokers): multi-partition ids, their resume rule, their streams' frames."""

import threading

import pytest

from myapp.events import Event
from myapp.ids import format_id, format_ids, parse_ids, position
from myapp.partitions import MultiSubscription
from myapp.resume import EXPIRED, MALFORMED, TRIMMED, UNKNOWN, replay_parts, start_positions
from myapp.subscription import Heartbeat, Reset
from tests.sse_client import parse_all

NOW = 1_763_726_400_000


def test_multi_partition_ids_round_trip():
    """An id carries one position per partition, in partition order; parsing gives them back."""
    positions = {7: position(NOW + 5), 3: position(NOW, 3)}
    text = format_ids(positions)
    assert text == f"3:{NOW}-3,7:{NOW + 5}-0"
    assert parse_ids(text) == positions


@pytest.mark.parametrize(
    "text",
    [None, "", f"{NOW}-3", f"3:{NOW}-3", f"3:{NOW}-3,3:{NOW}-4", f"3:{NOW}-3,", f"3:{NOW}-3,x:1-1",
     f"3:{NOW}-3,7:{NOW}-{1 << 22}", f"3:{NOW}-3,12345:{NOW}-0", ",".join(f"{n}:{NOW}-0" for n in range(65))],
    ids=["none", "empty", "plain", "one part", "repeated part", "trailing comma", "bad part", "seq too big",
         "part too long", "too many parts"],
)  # fmt: skip
def test_malformed_multi_partition_ids_parse_to_none(text):
    """Anything but 2 to 64 distinct ``<p>:<ms>-<seq>`` entries is malformed."""
    assert parse_ids(text) is None


HEADS = [position(NOW, 9), position(NOW + 1, 0), position(NOW + 2, 0)]


@pytest.mark.parametrize(
    ("last_event_id", "expected"),
    [
        (None, ({0: HEADS[0], 2: HEADS[2]}, None)),
        (format_ids({0: HEADS[0] - 3, 2: HEADS[2] - 1}), ({0: HEADS[0] - 3, 2: HEADS[2] - 1}, None)),
        (format_id(HEADS[0]), ({0: HEADS[0], 2: HEADS[2]}, MALFORMED)),
        (format_ids({0: HEADS[0], 1: HEADS[1]}), ({0: HEADS[0], 2: HEADS[2]}, MALFORMED)),
        (format_ids({0: HEADS[0], 2: HEADS[2] + 1}), ({0: HEADS[0], 2: HEADS[2]}, UNKNOWN)),
        (format_ids({0: position(NOW - 10_000), 2: HEADS[2]}), ({0: HEADS[0], 2: HEADS[2]}, EXPIRED)),
    ],
    ids=["fresh", "resumes", "plain id", "other partitions", "ahead", "expired"],
)
def test_start_positions_applies_the_rule_per_partition(last_event_id, expected):
    """Each partition the stream reads must resume; else the whole stream starts at the heads with the reason."""
    assert start_positions(last_event_id, heads=HEADS, parts=(0, 2), ttl_ms=5000) == expected


def _event(channel, pos, part, prev=0, data="d"):
    return Event(channel, pos, "t", data, prev, part)


def test_replay_parts_replays_each_channel_after_its_partition():
    """Each channel replays after its own partition's start; a hole in any partition means a reset."""
    part_of = {"a": 0, "b": 2}.__getitem__
    a = [_event("a", position(NOW, n), 0, prev=position(NOW, n - 1)) for n in range(1, 4)]
    b = [_event("b", position(NOW - 1, n), 2, prev=position(NOW - 1, n - 1)) for n in range(1, 3)]
    by_channel = {"a": a, "b": b}
    got = replay_parts(("a", "b"), part_of, by_channel, {0: a[0].pos, 2: b[0].pos}, (0, 0, 0))
    assert got == [b[1], a[1], a[2]], "partition 2's event is older by the clock"
    assert replay_parts(("a", "b"), part_of, by_channel, {0: a[0].pos, 2: 1}, (0, 0, 0)) is None, "b lost events"
    assert replay_parts(("a", "b"), part_of, by_channel, {0: a[0].pos, 2: b[0].pos}, (0, 0, b[1].pos)) is None


def _multi():
    return MultiSubscription(
        ("a", "b"), None, parts=(0, 2), queue_size=10, lock=threading.Lock(), leave=lambda *_: None
    )


def _messages(subscription):
    _, frames = subscription.get(0)
    return parse_all(b"".join(frames))


def test_multi_partition_stream_ids_carry_each_partition_and_drop_duplicates():
    """A stream over two partitions sends each event with both positions, and drops what it has per partition."""
    sub = _multi()
    start = {0: position(NOW, 1), 2: position(NOW - 5, 0)}
    sub.begin(start, None, [_event("a", position(NOW, 2), 0)])
    assert sub.start_id == format_ids(start)
    sub.offer(_event("b", position(NOW - 4, 0), 2, data="b1"))
    sub.offer(_event("a", position(NOW, 2), 0, data="dup"))
    sub.offer(_event("b", position(NOW - 5, 0), 2, data="old"))
    sub.offer(_event("a", position(NOW + 1, 0), 0, data="a2"))
    messages = _messages(sub)
    assert [m.data for m in messages] == ["d", "b1", "a2"]
    assert [parse_ids(m.last_event_id) for m in messages] == [
        {0: position(NOW, 2), 2: position(NOW - 5, 0)},
        {0: position(NOW, 2), 2: position(NOW - 4, 0)},
        {0: position(NOW + 1, 0), 2: position(NOW - 4, 0)},
    ]


def test_multi_partition_heartbeats_and_resets_move_only_their_partitions():
    """A heartbeat moves every partition to the hub's; a reset moves its own partition only."""
    sub = _multi()
    sub.begin({0: position(NOW), 2: position(NOW)}, None)
    sub.offer([position(NOW + 1), position(NOW + 9), position(NOW + 2)])
    sub.offer([position(NOW + 1), position(NOW + 9), position(NOW + 2)])  # nothing moved: no id
    sub.offer(Reset(TRIMMED, position(NOW + 7), part=2))
    frames = [frame for _, frames in [sub.get(0)] for frame in frames]
    assert frames[0] == Heartbeat(0, id=format_ids({0: position(NOW + 1), 2: position(NOW + 2)})).frame
    messages = parse_all(b"".join(frames))
    assert messages[-1].type == "stream.reset"
    assert parse_ids(messages[-1].last_event_id) == {0: position(NOW + 1), 2: position(NOW + 7)}


@pytest.mark.parametrize("last_event_id", [f"4:{NOW}-0,14:{NOW}-0", "0:1-1,1:1-1"], ids=["two parts", "part 0"])
def test_single_order_brokers_take_multi_partition_ids_as_malformed(last_event_id, hub_factory):
    """The memory broker (one partition, like Redis and PostgreSQL) resets a multi-partition id as malformed."""
    from myapp.brokers.memory import MemoryBroker

    hub = hub_factory(MemoryBroker())
    subscription = hub.subscribe(["room:a", "room:b"], last_event_id=last_event_id)
    assert subscription.reset == MALFORMED
    assert subscription.start_id == format_id(subscription.start), "its ids stay <ms>-<seq>"
    subscription.close()
