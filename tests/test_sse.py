"""The SSE encoder (myapp.sse) against the spec's parsing rules (WHATWG HTML 9.2.6)."""

import pytest

from myapp import sse
from tests.sse_client import Message, SSEParser, parse_all

CASES = [
    # (id, encode kwargs, exact bytes)
    ("plain", {"data": "hello"}, b"data: hello\n\n"),
    ("event type", {"data": "x", "event": "job.finished"}, b"event: job.finished\ndata: x\n\n"),
    ("id", {"data": "x", "id": "17-3"}, b"id: 17-3\ndata: x\n\n"),
    ("retry", {"retry": 2500}, b"retry: 2500\n\n"),
    ("comment", {"comment": "heartbeat"}, b":heartbeat\n\n"),
    ("empty comment", {"comment": ""}, b":\n\n"),
    ("multi-line comment", {"comment": "a\nb"}, b":a\n:b\n\n"),
    ("empty data", {"data": ""}, b"data: \n\n"),
    ("LF", {"data": "a\nb"}, b"data: a\ndata: b\n\n"),
    ("CRLF", {"data": "a\r\nb"}, b"data: a\ndata: b\n\n"),
    ("lone CR", {"data": "a\rb"}, b"data: a\ndata: b\n\n"),
    ("trailing LF", {"data": "a\n"}, b"data: a\ndata: \n\n"),
    ("lone CR at end", {"data": "a\r"}, b"data: a\ndata: \n\n"),
    ("leading space", {"data": " x"}, b"data:  x\n\n"),
    ("other line separators kept", {"data": "a\u2028b\x0bc\x85d"}, "data: a\u2028b\x0bc\x85d\n\n".encode()),
    ("emoji", {"data": "\U0001f680"}, "data: \U0001f680\n\n".encode()),
    ("id-only block", {"id": "5-0"}, b"id: 5-0\n\n"),
    (
        "all fields",
        {"data": "d", "event": "e", "id": "1-0", "retry": 10, "comment": "c"},
        b":c\nretry: 10\nevent: e\nid: 1-0\ndata: d\n\n",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_encode_exact_bytes(kwargs, expected):
    """Each kind of field is written exactly as the spec's parser expects."""
    assert sse.encode(**kwargs) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\r\nb\rc\nd", "a\nb\nc\nd"),
        ("", ""),
        (" leading", " leading"),
        ("a\r", "a\n"),
        ("\n", "\n"),
        ("x" * 70000, "x" * 70000),
    ],
    ids=["mixed breaks", "empty", "leading space", "lone CR at end", "only LF", "64 KiB+"],
)
def test_round_trip_through_spec_parser(data, expected):
    """A spec parser dispatches exactly the data, line breaks normalised to LF."""
    messages = parse_all(sse.encode(data, event="t", id="9-1"))
    assert messages == [Message("t", expected, "9-1")]


def test_empty_data_still_dispatches():
    """An event with empty data is dispatched (a data: line is written)."""
    assert parse_all(sse.encode("")) == [Message("message", "", "")]


def test_comment_and_id_only_blocks_dispatch_nothing_but_set_the_id():
    """Heartbeats dispatch no event; an id-only block moves the last event id."""
    sse_parser = SSEParser()
    assert sse_parser.feed(sse.comment() + sse.encode(id="42-0")) == []
    assert sse_parser.last_event_id == "42-0"
    assert sse_parser.comments == [""]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"], ids=["LF", "CR", "NUL"])
@pytest.mark.parametrize("field", ["event", "id"])
def test_field_injection_refused(field, bad):
    """CR, LF and NUL in event types and ids raise ValueError (CWE-93)."""
    with pytest.raises(ValueError, match=f"SSE {field} must not contain"):
        sse.encode("x", **{field: bad})


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_retry_must_be_a_non_negative_int(bad):
    """retry is ASCII digits only: anything but an int >= 0 is refused."""
    with pytest.raises(ValueError, match="retry"):
        sse.encode(retry=bad)


def test_output_is_utf8_without_bom():
    """Frames are UTF-8 and never start with a byte order mark."""
    frame = sse.encode("\ufeffé")
    assert not frame.startswith(b"\xef\xbb\xbf")
    assert frame == "data: \ufeffé\n\n".encode()
