"""Act on open streams at once, on every worker and host: ``disconnect`` and ``unsubscribe``.

Every connect authenticates and authorizes again, so revoking a user's
access takes effect at their next reconnect. These end the open streams now:
a control message on the broker's control channel (``CONTROL_CHANNEL``),
which every hub listens to (and replays from the history after an outage),
ends the matching streams of that hub:

- ``disconnect(user)``: every stream of the user ends with a ``stream.end``
  event ``{"reason": "disconnect", "reconnect": false}``; ``push.js`` stops
  for good (other clients that reconnect are authorized again);
- ``unsubscribe(user, channel)``: the user's streams that carry ``channel``
  end with ``{"reason": "unsubscribe", "reconnect": true}``: the page
  reconnects at once and is authorized again, so it keeps its other
  channels and loses that one if access to it was revoked (403).

Streams opened with a subscription token and no session have no user and
are not reached: keep token lifetimes short.
"""

import json

from myapp.brokers import get_broker
from myapp.brokers.base import CONTROL_CHANNEL
from myapp.conf import setting
from myapp.events import validate_channel
from myapp.ids import format_id
from myapp.subscription import DISCONNECT, UNSUBSCRIBE

__all__ = ["disconnect", "unsubscribe", "CONTROL_CHANNEL"]


def _owner(user):
    pk = getattr(user, "pk", user)
    if pk is None or pk == "":
        raise ValueError("an unsaved or anonymous user has no streams to end")
    return str(pk)


def _send(message):
    return format_id(get_broker().publish(CONTROL_CHANNEL, "control", json.dumps(message)))


def disconnect(user):
    """End every open stream of ``user`` (a user instance or its primary key), everywhere.

    Return the control message's id (str). Raise ValueError for an unsaved
    user and ``myapp.exceptions.BrokerUnavailable`` if the broker cannot take
    the message (then no stream was ended).
    """
    return _send({"action": DISCONNECT, "owner": _owner(user)})


def unsubscribe(user, channel):
    """End the open streams of ``user`` that carry ``channel`` (str), everywhere; they reconnect at once.

    Return the control message's id (str). Raise InvalidEvent for a bad
    channel name, ValueError for an unsaved user and BrokerUnavailable if the
    broker cannot take the message.
    """
    validate_channel(channel, max_length=setting("MYAPP_MAX_CHANNEL_LENGTH"))
    return _send({"action": UNSUBSCRIBE, "owner": _owner(user), "channel": channel})
