"""Where a stream starts, and what it must replay: the resume policy, as pure functions.

A browser that reconnects sends the id of the last event it received
(``Last-Event-ID``, WHATWG HTML 9.2.4). The stream resumes from that
position when every event after it is still in the broker's history;
otherwise it starts at the broker's newest position with a reset reason,
which the stream sends as ``stream.reset`` so the page reloads its state
(a non-200 answer would stop the browser for good, WHATWG HTML 9.2.3):

| Last-Event-ID                                  | start    | reset     |
| ---------------------------------------------- | -------- | --------- |
| none (a fresh stream)                          | head     | None      |
| not an id of ours                              | head     | MALFORMED |
| newer than the newest position handed out      | head     | UNKNOWN   |
| older than the history's time-to-live          | head     | EXPIRED   |
| followed by events no longer retained          | head     | TRIMMED   |
| otherwise                                      | the id   | None      |

The same rule decides, after a broker outage, which open streams have a
hole (``holes``). Nothing here does I/O; ``myapp.hub`` reads the broker.
"""

from myapp.ids import milliseconds, parse, parse_ids

__all__ = [
    "MALFORMED",
    "UNKNOWN",
    "EXPIRED",
    "TRIMMED",
    "start_position",
    "start_positions",
    "replay",
    "replay_parts",
    "holes",
]

#: Reasons a stream starts with a reset instead of resuming.
MALFORMED = "malformed"  # the Last-Event-ID is not an id of ours
UNKNOWN = "unknown"  # newer than anything the broker handed out
EXPIRED = "expired"  # older than the history's time-to-live
TRIMMED = "trimmed"  # events after it are no longer in the history


def start_position(last_event_id, *, head, ttl_ms):
    """Return ``(start, reset)`` for a stream asking to resume from ``last_event_id``.

    last_event_id: the client's Last-Event-ID (str), or None for a fresh
        stream. An empty string counts as None (browsers send none then).
    head: the broker's newest position (int) once the stream's channels are
        subscribed: every later event reaches the stream live.
    ttl_ms: the history's time-to-live in milliseconds (int or float).

    start: the position to replay from (int); reset: MALFORMED, UNKNOWN or
    EXPIRED, or None. Whether the events after ``start`` are all retained
    is ``replay``'s question.
    """
    if not last_event_id:
        return head, None
    resume = parse(last_event_id)
    if resume is None:
        return head, MALFORMED
    reset = _refusal(resume, head, ttl_ms)
    return (head, reset) if reset is not None else (resume, None)


def start_positions(last_event_id, *, heads, parts, ttl_ms):
    """Return ``(start, reset)`` for a stream reading several partitions (a partitioned broker).

    heads: the newest position of each partition (sequence of int indexed by
        partition) once the stream's channels are subscribed.
    parts: the partitions the stream reads (iterable of int, at least two).
    last_event_id, ttl_ms: as for ``start_position``; the id must be a
        ``myapp.ids.format_ids`` id naming exactly ``parts``, else MALFORMED.

    start: dict partition -> position. The rule of the table applies to each
    partition; the first partition that cannot resume resets the whole
    stream (at every partition's head).
    """
    head = {part: heads[part] for part in parts}
    if not last_event_id:
        return head, None
    resume = parse_ids(last_event_id)
    if resume is None or resume.keys() != head.keys():
        return head, MALFORMED
    for part, pos in resume.items():
        reset = _refusal(pos, head[part], ttl_ms)
        if reset is not None:
            return head, reset
    return resume, None


def _refusal(resume, head, ttl_ms):
    """UNKNOWN, EXPIRED or None for resuming at ``resume`` in an order whose newest position is ``head``."""
    if resume > head:
        return UNKNOWN
    if milliseconds(head) - milliseconds(resume) > ttl_ms:
        return EXPIRED
    return None


def replay(channels, by_channel, start, epoch=0):
    """Return the events of ``channels`` after ``start`` in ascending position, or None if some are gone.

    channels: the stream's channel names (iterable of str).
    by_channel: dict channel -> list of ``myapp.events.Event`` read from the
        history after a position <= ``start``, ascending (``History.events``
        grouped by channel); a channel may be missing.
    start: the position the stream resumes after (int).
    epoch: ``History.epoch``: positions between 0 and it are from before
        the broker lost its data.

    None means an event after ``start`` is no longer retained (the first
    retained one's ``prev`` is after ``start``), or ``start`` is from before
    the epoch: the stream must reset (TRIMMED).
    """
    events = []
    for channel in channels:
        retained = _retained(by_channel.get(channel, ()), start, epoch)
        if retained is None:
            return None
        events.extend(retained)
    events.sort(key=_position)
    return events


def replay_parts(channels, partition, by_channel, start, epochs):
    """``replay`` for a stream reading several partitions: each channel replays after its partition's start.

    partition: ``Broker.partition`` (channel -> int). start: dict partition ->
    position (``start_positions``). epochs: ``History.epoch`` of a
    partitioned broker (sequence of int indexed by partition).

    The events come in ascending position within each partition, the
    partitions interleaved by broker clock (their positions' milliseconds).
    """
    events = []
    for channel in channels:
        part = partition(channel)
        retained = _retained(by_channel.get(channel, ()), start[part], epochs[part])
        if retained is None:
            return None
        events.extend(retained)
    events.sort(key=_interleaved)
    return events


def _retained(events, start, epoch):
    """The events after ``start`` of one channel, or None if some are gone (see ``replay``)."""
    if 0 < start < epoch:
        return None
    retained = [event for event in events if event.pos > start]
    if retained and retained[0].prev > start:
        return None
    return retained


def holes(history, after, channels):
    """Return the channels (set of str) that lost events after position ``after``.

    history: the broker's ``History`` of ``channels`` after ``after``.
    A broker that lost its data after ``after`` (``epoch`` > ``after``)
    cannot say what was published before it did: every channel counts.
    A partitioned broker (``after`` a sequence per partition) reports the
    channels of a partition that lost its data in ``trimmed`` itself.
    """
    if type(after) is int and history.epoch > after:
        return set(channels)
    return set(history.trimmed)


def _position(event):
    return event.pos


def _interleaved(event):
    return (milliseconds(event.pos), event.part, event.pos)
