"""Event ids: positions in one broker-wide order (one per partition on Redis Cluster).

Every event a broker accepts gets a position: the broker's clock in
milliseconds plus a sequence number within that millisecond, written
``"<ms>-<seq>"`` like a Redis stream id (e.g. ``"1763726400000-3"``).
Positions grow strictly with the order in which the broker delivers events to
listeners, across all channels, so one id tells a reconnecting stream where to
resume every channel it carries, and a stream can drop anything at or before
the last position it sent.

In Python a position is an int, ``ms << SEQ_BITS | seq``, so comparing two
positions is one int comparison on the hot path.

Partitioned brokers (Redis Cluster, ``myapp.brokers.redis_cluster``) keep one
such order per *partition* (a fixed group of channels): positions compare only
within a partition. A stream whose channels all fall in one partition (every
stream of a single-order broker, and every single-channel stream) keeps the
plain ``"<ms>-<seq>"`` id; a stream reading several partitions carries one
position per partition it reads (``format_ids``).
"""

import re

__all__ = ["SEQ_BITS", "MAX_PARTS", "parse", "format_id", "parse_ids", "format_ids", "position", "milliseconds"]

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


#: Longest multi-partition id ``parse_ids`` accepts: 64 partitions of at most 29 characters each.
MAX_PARTS = 64
_PART = re.compile(r"([0-9]{1,4}):([0-9]{1,15}-[0-9]{1,7})")


def format_ids(positions):
    """Return the id string of a stream that reads several partitions.

    positions: dict partition (int) -> position (int). The id is
    ``"<p>:<ms>-<seq>"`` per partition, in ascending partition order, joined
    with ``,`` (e.g. ``"3:1763726400000-3,7:1763726400005-0"``): one position
    per partition the stream reads, never one per channel.
    """
    return ",".join(f"{part}:{format_id(positions[part])}" for part in sorted(positions))


def parse_ids(text):
    """Return the dict partition -> position of a multi-partition id, or None if it is malformed.

    text: what ``format_ids`` writes, with 2 to MAX_PARTS distinct
    partitions. A plain ``"<ms>-<seq>"`` id, a repeated partition and
    anything else give None.
    """
    if not text or len(text) > 30 * MAX_PARTS or "," not in text:
        return None
    positions = {}
    for item in text.split(","):
        match = _PART.fullmatch(item)
        if match is None:
            return None
        part, pos = int(match[1]), parse(match[2])
        if pos is None or part in positions:
            return None
        positions[part] = pos
    return positions if len(positions) <= MAX_PARTS else None
