"""A stream over several partitions of a partitioned broker (Redis Cluster): its positions and its ids.

Positions compare only within a partition (``myapp.ids``), so such a stream
keeps one per partition it reads and sends ids carrying each
(``myapp.ids.format_ids``). Everything else (direct writes, the queue, its
limits) is ``myapp.subscription.Subscription``'s: each item is translated
into one with this stream's id and handed to it.
"""

from myapp.events import Event
from myapp.ids import format_ids
from myapp.subscription import Heartbeat, Reset, Subscription

__all__ = ["MultiSubscription"]


#: What a multi-partition stream offers for a heartbeat that moves none of its partitions.
_STILL = Heartbeat(0)


class MultiSubscription(Subscription):
    """A stream whose channels span several partitions of a partitioned broker.

    parts: the partitions it reads (tuple of int, ascending, at least two).

    ``start`` is a dict partition -> position, and so is ``positions``, the
    position the client has in each partition once everything handed over
    is written. Its ids are ``myapp.ids.format_ids`` of ``positions``, so
    each frame is its own copy of the event's shared frame with that id (one
    copy per delivery, for these streams only); ``pos`` merely counts what
    was handed over. The hub offers the list of its positions (one per
    partition) for a heartbeat.
    """

    __slots__ = ("positions",)

    def __init__(self, channels, owner, *, parts, **options):
        super().__init__(channels, owner, **options)
        self.part = -1
        self.parts = parts
        self.positions = dict.fromkeys(parts, 0)

    @property
    def start_id(self):
        return format_ids(self.start)

    def cursor(self, positions):
        return {part: positions[part] for part in self.parts}

    def begin(self, start, reset, replay=()):
        self.start = dict(start)
        self.positions = dict(start)
        self.reset = reset
        frames = self._frames
        for event in replay:
            self.positions[event.part] = event.pos
            frames.append(self._copy(event).frame)
            self.pos += 1
        self._room += len(replay)

    def offer(self, item):
        kind = type(item)
        positions = self.positions
        if kind is Event:
            part = item.part
            if item.pos <= positions[part]:
                return None
            positions[part] = item.pos
            item = self._copy(item)
        elif kind is list:
            moved = False
            for part in self.parts:
                if item[part] > positions[part]:
                    positions[part] = item[part]
                    moved = True
            item = Heartbeat(self.pos + 1, id=format_ids(positions)) if moved else _STILL
        elif kind is Reset:
            part = item.part
            positions[part] = item.pos if item.backwards else max(positions[part], item.pos)
            item = Reset(item.reason, self.pos, id=format_ids(positions))
        return Subscription.offer(self, item)

    def _copy(self, event):
        """``event`` with this stream's id in its frame, numbered after what was handed over."""
        frame = event.frame
        start = frame.index(b"\nid: ") + 5
        end = frame.index(b"\n", start)
        copy = Event(event.channel, self.pos + 1, event.event_type, event.data, event.prev, event.part)
        copy._frame = frame[:start] + format_ids(self.positions).encode() + frame[end:]
        return copy
