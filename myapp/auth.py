"""Who may listen: choosing and authorizing a stream's channels.

The model (README "Authorization"):

- A logged-in user's own channel (``user:<pk>``) is readable by that user's
  session only. ``user:`` channels of other users are refused before any
  authorizer runs.
- Any other channel is admitted by the callable named in
  MYAPP_CHANNEL_AUTHORIZER, ``authorizer(request, channel)``, which returns
  True (admit), False (refuse) or ``GONE`` (the channel has ended for good:
  nothing to stream). No authorizer means every such channel is refused.
- A signed subscription token (``myapp.tokens``) admits exactly the channels
  it names, for anonymous pages and other origins.
- Checks run when a stream opens, so a revoked user loses access at the next
  reconnect at the latest; streams end after MYAPP_STREAM_LIFETIME_SECONDS to
  force one.
"""

from django.utils.module_loading import import_string

from myapp.conf import setting
from myapp.events import validate_channel
from myapp.exceptions import BrokerConfigurationError, InvalidEvent
from myapp.publish import USER_CHANNEL_PREFIX, user_channel
from myapp.tokens import InvalidToken, validate_granted, verify_token

__all__ = ["GONE", "Grant", "StreamRefused", "grant_stream", "get_authorizer"]


class _Gone:
    def __repr__(self):
        return "GONE"


#: An authorizer's answer for a channel that has ended for good.
GONE = _Gone()


class StreamRefused(Exception):
    """The stream cannot be opened: ``status`` (int) and ``reason`` (str) for the response."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Grant:
    """The channels a stream may carry and the key its per-user limit counts.

    channels: tuple of channel names (str), or empty when every requested
        channel is GONE (answer 204).
    key: the user's primary key (counted by MYAPP_MAX_STREAMS_PER_USER), or
        None for token-only streams.
    """

    __slots__ = ("channels", "key")

    def __init__(self, channels, key):
        self.channels = channels
        self.key = key


def get_authorizer():
    """Return the MYAPP_CHANNEL_AUTHORIZER callable, or None if unset.

    Raise BrokerConfigurationError if the dotted path cannot be imported.
    """
    path = setting("MYAPP_CHANNEL_AUTHORIZER")
    if path is None:
        return None
    if callable(path):
        return path
    try:
        return import_string(path)
    except ImportError as error:
        raise BrokerConfigurationError(
            f"MYAPP_CHANNEL_AUTHORIZER {path!r} cannot be imported ({error}); "
            "name a callable(request, channel) -> bool, or set it to None"
        ) from None


def grant_stream(request, requested, token=None):
    """Decide which channels a stream may carry.

    requested: the ``channel`` query parameters (list of str); empty means
        the user's own channel (or, with a token, every channel it grants).
        Repeats count once toward MYAPP_MAX_CHANNELS_PER_STREAM.
    token: a subscription token (str) or None.

    Return a Grant. Raise StreamRefused with 400 (bad or too many channel
    names requested, or a signed token granting no channel or an invalid
    name), 401 (not logged in, and no token or one that is forged, malformed
    or expired) or 403 (a channel the requester may not read).
    """
    limit = setting("MYAPP_MAX_CHANNELS_PER_STREAM")
    requested = list(dict.fromkeys(requested))  # a repeated channel is carried, and counted, once
    if len(requested) > limit:
        raise StreamRefused(400, f"a stream may carry at most {limit} channels (MYAPP_MAX_CHANNELS_PER_STREAM)")
    for channel in requested:
        try:
            validate_channel(channel, max_length=setting("MYAPP_MAX_CHANNEL_LENGTH"))
        except InvalidEvent as error:
            raise StreamRefused(400, str(error)) from None
    user = getattr(request, "user", None)
    key = user.pk if user is not None and user.is_authenticated else None

    if token is not None:
        try:
            granted = verify_token(token)
        except InvalidToken as error:
            raise StreamRefused(401, f"invalid subscription token: {error}") from None
        try:
            validate_granted(granted)
        except InvalidEvent as error:
            # Signed, so readable, but naming what no stream may carry.
            raise StreamRefused(400, f"the subscription token cannot open a stream: {error}") from None
        if not requested:
            requested = list(dict.fromkeys(granted))[:limit]
        missing = [channel for channel in requested if channel not in granted]
        if missing:
            raise StreamRefused(403, f"the token does not grant channel {missing[0]!r}")
        return Grant(tuple(requested), key)

    if key is None:
        raise StreamRefused(401, "log in, or pass a subscription token")
    own = user_channel(user)
    if not requested:
        return Grant((own,), key)
    authorizer = None
    channels = []
    for channel in requested:
        if channel == own:
            channels.append(channel)
            continue
        if channel.startswith(USER_CHANNEL_PREFIX):
            raise StreamRefused(403, f"channel {channel!r} is another user's private channel")
        if authorizer is None:
            authorizer = get_authorizer() or (lambda request, channel: False)
        decision = authorizer(request, channel)
        if decision is GONE:
            continue
        if decision is not True:
            raise StreamRefused(403, f"not allowed to read channel {channel!r}")
        channels.append(channel)
    return Grant(tuple(channels), key)
