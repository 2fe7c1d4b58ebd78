"""Property tests: whatever our API accepts survives our encoder and a spec parser exactly."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from myapp import sse
from myapp.events import validate_event_type, validate_key
from myapp.exceptions import InvalidEvent
from myapp.ids import format_id, parse
from tests.sse_client import SSEParser

# Unicode text without lone surrogates (those cannot be sent on a UTF-8 stream).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
field = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), min_size=1, max_size=64)
event_type = field.filter(lambda value: not value.startswith("stream."))


def normalised(data):
    """What WHATWG HTML 9.2.6 hands to the page: every CRLF or CR becomes LF."""
    return re.sub(r"\r\n?", "\n", data)


@given(data=text, event=event_type, event_id=field)
def test_any_event_round_trips_through_a_spec_parser(data, event, event_id):
    """Data (line breaks normalised to LF, as the spec says), type and id come back exactly."""
    validate_event_type(event, max_length=64)
    parser = SSEParser()
    (message,) = parser.feed(sse.encode(data, event=event, id=event_id))
    assert (message.type, message.data, message.last_event_id) == (event, normalised(data), event_id)


@given(data=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=300))
def test_data_without_cr_round_trips_byte_for_byte(data):
    """Without CR there is nothing to normalise: the page gets exactly the data sent."""
    assert SSEParser().feed(sse.encode(data))[0].data == data


@given(frames=st.lists(st.tuples(text, event_type), min_size=1, max_size=8), cut=st.integers(1, 50))
def test_frames_split_at_any_byte_parse_the_same(frames, cut):
    """A stream cut into arbitrary chunks (even inside a UTF-8 sequence or a CRLF) parses the same."""
    raw = b"".join(sse.encode(data, event=kind, id=str(n)) for n, (data, kind) in enumerate(frames))
    parser = SSEParser()
    messages = []
    for start in range(0, len(raw), cut):
        messages.extend(parser.feed(raw[start : start + cut]))
    assert [(m.type, m.data) for m in messages] == [(kind, normalised(data)) for data, kind in frames]


@given(value=st.text(max_size=80))
def test_validation_refuses_exactly_cr_lf_nul(value):
    """validate_key accepts a non-empty str iff it has no CR, LF or NUL (and no lone surrogate)."""
    has_surrogate = any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    expected_ok = bool(value) and not any(char in value for char in "\r\n\0") and not has_surrogate
    try:
        validate_key(value, max_length=128)
        ok = True
    except InvalidEvent:
        ok = False
    assert ok == expected_ok


@given(ms=st.integers(0, 10**15 - 1), seq=st.integers(0, (1 << 22) - 1))
def test_ids_round_trip(ms, seq):
    """Every position formats to "<ms>-<seq>" and parses back to itself."""
    pos = (ms << 22) | seq
    assert parse(format_id(pos)) == pos
    assert format_id(pos) == f"{ms}-{seq}"


@pytest.mark.parametrize("bad", ["", "1", "1-", "-1", "a-1", "1-2-3", "1 -2", "+1-2", "1-4194304", "1" * 16 + "-0"])
def test_malformed_ids_parse_to_none(bad):
    """Anything but "<digits>-<digits>" in range is malformed."""
    assert parse(bad) is None
