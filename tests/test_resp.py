"""The RESP2 reply reader of the hub's Redis subscriber connection (myapp.brokers._resp)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from myapp.brokers._resp import RedisReplyError, ReplyReader


def bulk(value):
    return b"$%d\r\n%b\r\n" % (len(value), value)


def message(channel, data):
    return b"*3\r\n" + bulk(b"message") + bulk(channel) + bulk(data)


def test_pubsub_replies_parse_into_lists():
    """Messages and subscribe confirmations come out as [kind, channel, data-or-count], in order."""
    reader = ReplyReader()
    reader.feed(b"*3\r\n" + bulk(b"subscribe") + bulk(b"c:a") + b":1\r\n" + message(b"c:a", b"1-0\nt\nhi\r\nthere"))
    assert reader.replies() == [[b"subscribe", b"c:a", 1], [b"message", b"c:a", b"1-0\nt\nhi\r\nthere"]]
    assert reader.replies() == []


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_replies_split_at_any_byte_parse_the_same(payloads, cuts):
    """However the bytes are split across reads, every reply comes out once, whole, in order."""
    wire = b"".join(message(b"c:%d" % n, payload) for n, payload in enumerate(payloads))
    points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
    reader = ReplyReader()
    got = []
    for start, end in zip(points, points[1:], strict=False):
        reader.feed(wire[start:end])
        got.extend(reader.replies())
    assert got == [[b"message", b"c:%d" % n, payload] for n, payload in enumerate(payloads)]


@pytest.mark.parametrize("wire", [b"-ERR unknown command\r\n", b"?what\r\n", b"*x\r\n"], ids=["error", "type", "count"])
def test_error_and_garbage_raise(wire):
    """An error reply or bytes that are not RESP2 raise (the hub then reconnects)."""
    reader = ReplyReader()
    reader.feed(wire)
    with pytest.raises(ValueError):
        reader.replies()
    assert issubclass(RedisReplyError, ValueError)
