"""The event value type and the rules for channel names, event types and ids.

Imports no Django: limits are passed in by the caller (see ``myapp.conf``).
"""

import re

from . import sse
from .exceptions import InvalidEvent
from .ids import format_id
from .sink import chunk

__all__ = [
    "Event",
    "CHANNEL_CHARS",
    "RESERVED_PREFIX",
    "PRESENCE_PREFIX",
    "CLOSE_EVENT",
    "OPEN_EVENT",
    "RESET_EVENT",
    "validate_channel",
    "validate_event_type",
    "validate_key",
    "validate_text",
]

#: Characters allowed in a channel name (besides its length limit).
CHANNEL_CHARS = "A-Z a-z 0-9 _ . : @ = + -"
_CHANNEL = re.compile(r"[A-Za-z0-9_.:@=+\-]+")

#: Event types starting with this prefix belong to the service.
RESERVED_PREFIX = "stream."
#: Event types starting with this are the hubs' presence announcements.
PRESENCE_PREFIX = "presence."
#: Event type that tells our page script to close its EventSource for good.
#: Publishers may send it (e.g. after ``job.finished`` on a job's channel).
CLOSE_EVENT = "stream.close"
#: Event type that starts every stream (unless it starts with a reset): its
#: id is the stream's starting position. Only the service sends it.
OPEN_EVENT = "stream.open"
#: Event type the stream sends when it cannot resume from a Last-Event-ID
#: (malformed, older than the history, or trimmed): the page should reload
#: its state. Only the service sends it.
RESET_EVENT = "stream.reset"


class Event:
    """One published event, as the broker delivers it to a hub.

    channel: the channel name (str).
    pos: the broker position (int, see ``myapp.ids``); ``id`` is its string.
    event_type: the SSE event type (str).
    data: the event data (str, usually JSON text).
    prev: the channel's previous position (int), known for events read from
        history (0 for the channel's first event, or when unknown): a replay
        from position p has a gap if its first event's ``prev`` is after p.
    part: the broker partition whose order ``pos`` belongs to (int; always 0
        with a single-order broker, see ``myapp.ids``).

    ``frame`` is the complete SSE frame (bytes), encoded once per process on
    first use and shared by every stream that carries the event; ``chunk``
    is the same frame as one HTTP/1.1 chunk, for direct writes
    (``myapp.sink``).
    """

    __slots__ = ("channel", "pos", "event_type", "data", "prev", "part", "_frame", "_chunk")

    def __init__(self, channel, pos, event_type, data, prev=0, part=0):
        self.channel = channel
        self.pos = pos
        self.event_type = event_type
        self.data = data
        self.prev = prev
        self.part = part
        self._frame = None
        self._chunk = None

    @property
    def id(self):
        return format_id(self.pos)

    @property
    def frame(self):
        frame = self._frame
        if frame is None:
            frame = self._frame = sse.encode(self.data, event=self.event_type, id=format_id(self.pos))
        return frame

    @property
    def chunk(self):
        wire = self._chunk
        if wire is None:
            wire = self._chunk = chunk(self.frame)
        return wire

    def wire(self, sent, chunked):
        """Return (bytes to write, position after them) for a stream that was handed position ``sent``.

        (None, sent) when the stream has this event already; ``chunked``
        picks ``chunk`` (a direct write) over ``frame``.
        """
        pos = self.pos
        if pos <= sent:
            return None, sent
        return (self.chunk if chunked else self.frame), pos

    def __repr__(self):
        return f"<Event {self.channel} {self.id} {self.event_type} {self.data[:40]!r}>"

    def __eq__(self, other):
        if not isinstance(other, Event):
            return NotImplemented
        return (self.channel, self.pos, self.event_type, self.data) == (
            other.channel,
            other.pos,
            other.event_type,
            other.data,
        )

    __hash__ = None


def validate_text(name, value):
    """Raise InvalidEvent unless ``value`` is a str that encodes to UTF-8.

    Lone surrogates (e.g. ``"\\ud800"``) cannot be sent on a UTF-8 stream.
    """
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(f"{name} is not valid Unicode text (lone surrogate)") from None


def validate_channel(channel, *, max_length):
    """Raise InvalidEvent unless ``channel`` is a valid channel name.

    A channel name is 1 to ``max_length`` characters from CHANNEL_CHARS.
    """
    if not isinstance(channel, str):
        raise InvalidEvent(f"channel must be a str, not {type(channel).__name__}")
    if not channel:
        raise InvalidEvent("channel must not be empty")
    if len(channel) > max_length:
        raise InvalidEvent(f"channel is {len(channel)} characters; the limit is {max_length}")
    if not _CHANNEL.fullmatch(channel):
        raise InvalidEvent(f"channel may only contain {CHANNEL_CHARS}: {channel[:80]!r}")


def _validate_field(name, value, max_length):
    validate_text(name, value)
    if not value:
        raise InvalidEvent(f"{name} must not be empty")
    if len(value) > max_length:
        raise InvalidEvent(f"{name} is {len(value)} characters; the limit is {max_length}")
    for char in sse.FORBIDDEN_IN_FIELD:
        if char in value:
            raise InvalidEvent(f"{name} must not contain CR, LF or NUL: {value[:80]!r}")


def validate_event_type(event_type, *, max_length):
    """Raise InvalidEvent unless ``event_type`` may be published.

    1 to ``max_length`` characters, no CR, LF or NUL (WHATWG HTML 9.2.6; a
    line break would inject fields, CWE-93), not a reserved ``stream.``
    type other than CLOSE_EVENT, and not a ``presence.`` type (only hubs
    announce presence, ``myapp.presence``).
    """
    _validate_field("event type", event_type, max_length)
    if event_type.startswith(RESERVED_PREFIX) and event_type != CLOSE_EVENT:
        raise InvalidEvent(
            f"event types starting with {RESERVED_PREFIX!r} are reserved "
            f"(publishers may only send {CLOSE_EVENT!r}): {event_type!r}"
        )
    if event_type.startswith(PRESENCE_PREFIX):
        raise InvalidEvent(f"event types starting with {PRESENCE_PREFIX!r} are reserved for presence: {event_type!r}")


def validate_key(key, *, max_length):
    """Raise InvalidEvent unless ``key`` is a valid publisher-chosen event id.

    1 to ``max_length`` characters, no CR, LF or NUL.
    """
    _validate_field("id", key, max_length)
