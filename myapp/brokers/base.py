"""The broker contract: what every backend (Redis, PostgreSQL, memory) provides.

A broker does four things (the abstract methods of ``Broker`` and
``Listener``; a backend that lacks one fails at start-up with its name,
see ``myapp.brokers.load_broker``):

1. ``publish``: assign the event the next position in one broker-wide order
   (see ``myapp.ids``), add it to the channel's bounded history, and deliver
   it to every listener subscribed to the channel, in position order.
2. ``history``: return a channel's retained events after a position, and say
   whether some were trimmed, so a reconnecting stream can replay what it
   missed or learn that it must reset.
3. ``last_position``: the newest position handed out, to start a stream.
4. ``listener``: open one subscriber connection, owned by the process's hub
   greenlet (``myapp.hub``); never one per browser.

A *partitioned* broker (Redis Cluster) keeps one such order per partition, a
fixed group of channels (``partitions``, ``partition``): positions compare
only within a partition, ``heads`` gives each partition's newest, and
``history`` takes a position per partition. Every other backend has one
partition, 0, so its positions form one broker-wide order.

A broker object is created once per process (``myapp.brokers.get_broker``)
with the keyword-only ``OPTIONS`` of ``MYAPP_BROKER``. Its constructor checks
the options and must not do I/O: connections open on first use, after gevent
has patched the process.
"""

import abc
from typing import NamedTuple

from .options import positive_int, seconds

__all__ = ["Broker", "Listener", "History", "Subscribed", "Trimmed", "HUB_CHANNEL_PREFIX", "CONTROL_CHANNEL"]

#: Channels whose name starts with this are a hub's private channel
#: (position markers). ``!`` is outside the public channel charset.
HUB_CHANNEL_PREFIX = "!hub:"

#: The channel every hub listens to for control messages (``myapp.control``:
#: end a user's streams on every worker and host). Outside the public charset.
CONTROL_CHANNEL = "!control"


class History(NamedTuple):
    """What a broker retains of some channels after a position.

    events: list of ``myapp.events.Event`` in ascending position, all
        requested channels merged.
    trimmed: frozenset of the channels that had events after the position
        which are no longer retained (trimmed by length or age, or lost
        with the broker's data): a stream resuming those channels from that
        position would miss events.
    epoch: the position where the broker's retained order begins (int): 0
        while it never lost its data, else the position at which it started
        again (e.g. a Redis server restarted without persistence). Every
        channel counts as trimmed for a position between 0 and the epoch.
        A partitioned broker gives a tuple, one epoch per partition, and
        counts the channels of a partition that lost its data in
        ``trimmed`` itself.
    """

    events: list
    trimmed: frozenset
    epoch: int = 0


class Subscribed(NamedTuple):
    """A listener notice: the broker confirmed the subscription to ``channel``.

    Events published on the channel after this notice reaches the hub are
    delivered to the listener.
    """

    channel: str


class Trimmed(NamedTuple):
    """A listener notice: the event at ``pos`` on ``channel`` was trimmed before it could be read.

    Streams on the channel would have a gap, so the hub sends them a reset
    (``stream.reset``, reason ``trimmed``) positioned at ``pos`` (int, 0 if
    unknown) and they go on with later events.
    """

    channel: str
    pos: int = 0


class Broker(abc.ABC):
    """Base class of the broker backends.

    history_length: events kept per channel (int >= 1).
    history_ttl: seconds an event is kept (float > 0). An id older than this
        cannot be resumed and gets a reset (see ``myapp.resume``).

    Subclasses take their own keyword-only options too and raise
    ``myapp.exceptions.BrokerConfigurationError`` for a bad one (the
    helpers in ``myapp.brokers.options`` say what to fix). Every method that
    talks to the server raises ``myapp.exceptions.BrokerUnavailable`` when
    it cannot, within the backend's timeouts, and only then: input the
    server cannot store is the backend's to encode, never an outage.
    """

    #: False if events published in one process never reach another (the
    #: memory backend): the system checks refuse it with several workers.
    supports_multiple_processes = True

    #: The backend's ``Listener`` subclass; ``load_broker`` checks at
    #: start-up that it implements every abstract method.
    listener_class = None

    #: Independent position orders (int >= 1); see ``partition``.
    partitions = 1

    def partition(self, channel):
        """Return the partition (int in ``range(partitions)``) whose order ``channel``'s events take."""
        return 0

    def heads(self):
        """Return the newest position of each partition (list of int indexed by partition).

        One partition: ``[last_position()]``. Raise BrokerUnavailable on failure.
        """
        return [self.last_position()]

    def __init__(self, *, history_length=1000, history_ttl=3600.0):
        self.history_length = positive_int("history_length", history_length, unit="events per channel")
        self.history_ttl = seconds("history_ttl", history_ttl)

    @abc.abstractmethod
    def publish(self, channel, event_type, data, *, idempotency_key=None):
        """Publish one event and return its position (int).

        channel, event_type, data: str, already validated by the caller
            (``myapp.publish.validate_event``); data may hold any Unicode
            text that encodes to UTF-8, NUL included.
        idempotency_key: an optional publisher-chosen id (str). If an event
            with the same key was published on this channel within
            ``history_ttl``, publish nothing and return that event's position.

        Raise BrokerUnavailable if the broker cannot take the event; then it
        was not published.
        """

    @abc.abstractmethod
    def last_position(self):
        """Return the newest position handed out (int), 0 if none yet.

        Raise BrokerUnavailable on failure.
        """

    @abc.abstractmethod
    def history(self, channels, after):
        """Return the ``History`` of ``channels`` (iterable of str) after position ``after`` (int).

        A partitioned broker also takes a sequence of int indexed by
        partition: each channel's events after its partition's entry.

        At most ``history_length`` events per channel. Raise BrokerUnavailable
        on failure.
        """

    def listener(self, hub_channel):
        """Open and return a new ``Listener``, already subscribed to ``hub_channel``.

        hub_channel: the hub's private control channel (str starting with
        HUB_CHANNEL_PREFIX), where ``Listener.publish_marker`` publishes.
        Builds ``listener_class(self, hub_channel)``.

        Raise BrokerUnavailable if the connection cannot be opened.
        """
        return self.listener_class(self, hub_channel)

    @abc.abstractmethod
    def presence_update(self, hub_id, counts, ttl):
        """Record what hub ``hub_id`` holds, and count it alive for ``ttl`` seconds from now.

        hub_id: the hub's id (str, no spaces; ``Hub.hub_channel``).
        counts: dict mapping ``(key, member)`` (two str, no spaces in
            member) to this hub's current count (int >= 0; 0 deletes the
            entry). ``myapp.presence`` uses keys ``c:<channel>`` (who is on a
            channel; members are user ids, ``-`` for streams without a user)
            and ``o:<user id>`` (a user's streams, member ``n``).
        ttl: seconds (float). A hub that stops calling (a crashed worker) no
            longer counts once its ttl passed.

        Raise BrokerUnavailable on failure.
        """

    @abc.abstractmethod
    def presence_read(self, key, *, exclude=None):
        """Return ``{member: count}`` for ``key``, summed over the hubs still alive.

        exclude: a hub id whose entries are left out (the caller's own, which
        it knows better), or None. Members whose sum is 0 are left out.
        Raise BrokerUnavailable on failure.
        """

    def check(self):
        """Return a list of ``django.core.checks`` messages about this backend's configuration.

        Run by ``manage.py check`` and by each gunicorn worker at boot
        (``myapp.checks``); does no I/O. The base class has nothing to check.
        """
        return []

    def close(self):  # noqa: B027 - optional: a backend without connections has nothing to close
        """Close every connection this broker holds."""


class Listener(abc.ABC):
    """One subscriber connection to the broker, owned by one hub greenlet.

    Only the owning greenlet calls its methods, except ``wakeup`` which any
    greenlet or thread may call. Every method raises BrokerUnavailable when
    the connection is lost; the hub then closes it and opens a new one.
    """

    @abc.abstractmethod
    def subscribe(self, channels):
        """Ask the broker to deliver the events of ``channels`` (list of str).

        Returns at once; each confirmation arrives later from ``wait`` as a
        ``Subscribed`` notice.
        """

    @abc.abstractmethod
    def unsubscribe(self, channels):
        """Stop delivery of ``channels`` (list of str). No notice follows."""

    @abc.abstractmethod
    def wait(self, timeout):
        """Block until something arrives, ``wakeup`` is called, or ``timeout`` passes.

        timeout: seconds (float), or None to wait without limit.

        Return a list (possibly empty) of ``myapp.events.Event``,
        ``Subscribed`` and ``Trimmed`` notices, in the order the broker sent
        them: everything one read from the connection brought.
        """

    @abc.abstractmethod
    def wakeup(self):
        """Make a current or the next ``wait`` return promptly. Safe from any greenlet."""

    @abc.abstractmethod
    def publish_marker(self):
        """Publish an empty marker on this listener's hub channel.

        It takes the next position like any event, so when it comes back from
        ``wait`` every earlier event of the subscribed channels has arrived.
        The hub uses it to tell live connections from dead ones and to move
        idle streams' last event id forward.
        """

    @abc.abstractmethod
    def close(self):
        """Close the connection. Safe to call twice."""
