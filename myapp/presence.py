"""Presence: who is connected to a channel, and how many streams a user holds, across every worker and host.

Each hub counts its own streams (``Tracker``): per presence channel, the
users on it (a user id, or ``-`` for streams without one, e.g. a public
board's token), and per user, their streams (for MYAPP_MAX_STREAMS_PER_USER
across workers and hosts). It writes what changed to the broker in one batch
per heartbeat slice (a quarter of a second), never per event and never per
heartbeat per stream, and marks itself alive once per heartbeat interval with
a time-to-live of two intervals (``Broker.presence_update``): a crashed
worker's entries stop counting within two heartbeat intervals at most.

``presence(channel)`` sums what the live hubs wrote (``Broker.presence_read``),
so it lags a stream's open or close by up to one slice.

Channels whose name matches a pattern of MYAPP_PRESENCE_CHANNELS (``fnmatch``
patterns, e.g. ``"room:*"``) are tracked; with MYAPP_PRESENCE_EVENTS on,
the first stream of a user on such a channel (on any worker) publishes a
``presence.join`` event there, data ``{"user": "<id>"}``, and their last
stream leaving a ``presence.leave``. Publishers may not send ``presence.``
types themselves.
"""

import fnmatch
import json
import logging
from collections import Counter

from myapp.conf import setting
from myapp.events import validate_channel
from myapp.exceptions import BrokerUnavailable

__all__ = ["presence", "tracked", "PresenceNotEnabled", "Tracker", "JOIN_EVENT", "LEAVE_EVENT", "ANONYMOUS"]

log = logging.getLogger("myapp.presence")

#: Event types of presence changes (published by hubs, refused from publishers).
JOIN_EVENT = "presence.join"
LEAVE_EVENT = "presence.leave"
#: The member that counts streams without a user (token streams).
ANONYMOUS = "-"
_STREAMS = "n"


class PresenceNotEnabled(ValueError):
    """The channel matches no pattern of MYAPP_PRESENCE_CHANNELS, so nobody counts who is on it."""


def tracked(channel, patterns=None):
    """Return True if ``channel`` (str) matches a pattern of MYAPP_PRESENCE_CHANNELS (or of ``patterns``)."""
    patterns = setting("MYAPP_PRESENCE_CHANNELS") if patterns is None else patterns
    return any(fnmatch.fnmatchcase(channel, pattern) for pattern in patterns)


def presence(channel):
    """Return who is connected to ``channel`` on every worker and host.

    Returns ``{"users": [user id, ...], "anonymous": n}``: the primary keys
    (as str, sorted) of the users with at least one open stream on it, and
    how many streams without a user (subscription tokens) are open on it.

    Raise InvalidEvent for a bad channel name, PresenceNotEnabled if the
    channel matches no MYAPP_PRESENCE_CHANNELS pattern, and
    ``myapp.exceptions.BrokerUnavailable`` if the broker cannot answer.
    """
    from myapp.brokers import get_broker

    validate_channel(channel, max_length=setting("MYAPP_MAX_CHANNEL_LENGTH"))
    if not tracked(channel):
        raise PresenceNotEnabled(f"presence is not tracked on {channel!r}: add a pattern to MYAPP_PRESENCE_CHANNELS")
    counts = get_broker().presence_read("c:" + channel)
    return {
        "users": sorted(member for member in counts if member != ANONYMOUS),
        "anonymous": counts.get(ANONYMOUS, 0),
    }


class Tracker:
    """One hub's presence and per-user stream counts, written to the broker in batches.

    broker: the hub's broker. hub_id: the hub's id (str).
    patterns: the channel patterns tracked (list of str).
    events: publish ``presence.join`` / ``presence.leave`` (bool).
    per_user: count each user's streams for the limit across hubs (bool).
    ttl: seconds the hub counts as alive after each write (float).

    ``joined`` and ``left`` run with the hub's lock held and do no I/O;
    ``flush`` runs in the hub's heartbeat thread.
    """

    def __init__(self, broker, hub_id, *, patterns, events, per_user, ttl):
        self.broker = broker
        self.hub_id = hub_id
        self.patterns = list(patterns)
        self.events = events
        self.per_user = per_user
        self.ttl = ttl
        self._counts = Counter()  # (key, member) -> this hub's count
        self._written = {}  # (key, member) -> the count the broker has
        self._dirty = set()
        self._tracked = {}  # channel -> bool (fnmatch once per channel)
        self._alive_at = None  # time.monotonic() of the last successful write

    @property
    def active(self):
        """True if there is anything to count (patterns, or a per-user limit)."""
        return bool(self.patterns) or self.per_user

    def _keys(self, subscription):
        member = ANONYMOUS if subscription.owner is None else str(subscription.owner)
        for channel in subscription.channels:
            is_tracked = self._tracked.get(channel)
            if is_tracked is None:
                is_tracked = self._tracked[channel] = tracked(channel, self.patterns)
            if is_tracked:
                yield ("c:" + channel, member)
        if self.per_user and subscription.owner is not None:
            yield ("o:" + member, _STREAMS)

    def joined(self, subscription):
        """Count a stream that went live."""
        for key in self._keys(subscription):
            self._counts[key] += 1
            self._dirty.add(key)

    def left(self, subscription):
        """Uncount a stream that was live."""
        for key in self._keys(subscription):
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]
            self._dirty.add(key)

    def local_streams(self, owner):
        """This hub's live streams of user ``owner`` (int)."""
        return self._counts.get(("o:" + str(owner), _STREAMS), 0)

    def remote_streams(self, owner):
        """The streams of user ``owner`` on every other live hub (int). Raise BrokerUnavailable."""
        return self.broker.presence_read("o:" + str(owner), exclude=self.hub_id).get(_STREAMS, 0)

    def due(self, now, interval):
        """True if ``flush`` has something to write: changes, or the hub's liveness is ``interval`` s old."""
        return bool(self._dirty) or self._alive_at is None or now - self._alive_at >= interval

    def take(self, now):
        """Return the entries to write (dict), taking them (call with the hub's lock held).

        Everything after a silence longer than ``ttl`` (readers may have
        dropped this hub's entries meanwhile), else what changed.
        """
        if self._alive_at is None or now - self._alive_at > self.ttl:
            keys = set(self._counts) | set(self._written)
        else:
            keys = self._dirty
        self._dirty = set()
        return {key: self._counts.get(key, 0) for key in keys}

    def requeue(self, entries):
        """Take ``entries`` again at the next flush (call with the hub's lock held)."""
        self._dirty.update(entries)

    def write(self, entries, now):
        """Write ``entries`` from ``take`` (no lock held); return False if the broker did not take them."""
        try:
            self.broker.presence_update(self.hub_id, entries, self.ttl)
        except BrokerUnavailable as error:
            log.debug("presence: not written (%s); retrying", error)
            return False
        changes = []
        for key, count in entries.items():
            before = self._written.get(key, 0)
            if count:
                self._written[key] = count
            else:
                self._written.pop(key, None)
            if (before == 0) != (count == 0) and key[0].startswith("c:") and key[1] != ANONYMOUS:
                changes.append((key, count > 0))
        self._alive_at = now
        if self.events and changes:
            self._announce(changes)
        return True

    def _announce(self, changes):
        """Publish join/leave for users who appeared on (or left) a channel on every hub, not only this one."""
        for (key, member), present in changes:
            channel = key[2:]
            try:
                elsewhere = self.broker.presence_read(key, exclude=self.hub_id).get(member, 0)
                if not elsewhere:
                    event_type = JOIN_EVENT if present else LEAVE_EVENT
                    self.broker.publish(channel, event_type, json.dumps({"user": member}))
            except BrokerUnavailable as error:
                log.warning("presence: %s on %s not announced: %s", member, channel, error)
