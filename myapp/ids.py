"""Event ids: positions in one broker-wide order.

Every event a broker accepts gets a position: the broker's clock in
milliseconds plus a sequence number within that millisecond, written
``"<ms>-<seq>"`` like a Redis stream id (e.g. ``"1763726400000-3"``).
Positions grow strictly with the order in which the broker delivers events to
listeners, across all channels, so one id tells a reconnecting stream where to
resume every channel it carries, and a stream can drop anything at or before
the last position it sent.

In Python a position is an int, ``ms << SEQ_BITS | seq``, so comparing two
positions is one int comparison on the hot path.
"""

import re

__all__ = ["SEQ_BITS", "parse", "format_id", "position", "milliseconds"]

#: Bits of the int position that hold the sequence within one millisecond.
SEQ_BITS = 22
_SEQ_MASK = (1 << SEQ_BITS) - 1
_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,7})")


def position(ms, seq=0):
    """Return the int position of ``ms`` milliseconds and sequence ``seq``."""
    return (ms << SEQ_BITS) | seq


def milliseconds(pos):
    """Return the broker clock reading (ms since the Unix epoch) of a position."""
    return pos >> SEQ_BITS


def parse(text):
    """Return the int position of an id string, or None if it is malformed.

    text: ``"<ms>-<seq>"`` with at most 15 and 7 decimal digits, seq below
    2**SEQ_BITS. Anything else (including None, over-long or non-ASCII text)
    gives None.
    """
    if not text or len(text) > 23:
        return None
    match = _ID.fullmatch(text)
    if match is None:
        return None
    seq = int(match[2])
    if seq > _SEQ_MASK:
        return None
    return position(int(match[1]), seq)


def format_id(pos):
    """Return the id string (``"<ms>-<seq>"``) of an int position."""
    return f"{pos >> SEQ_BITS}-{pos & _SEQ_MASK}"
