"""Signed, expiring subscription tokens (Django's ``signing``).

A token names the channels it grants and when it expires. Pages opened from
another origin, or anonymous pages (a public status board), pass it to the
stream as ``?token=...``. It is a bearer credential until it expires: keep
lifetimes short and issue tokens only over HTTPS to whom may read the
channels.

Channel names are checked when a token is minted and again when it is used
(``myapp.auth.grant_stream``: 400), so a token signed before the rules or by
other code with the same SECRET_KEY cannot open a stream on a name no
publisher could use (such as the hub's own ``!hub:`` channels).
"""

import time

from django.core import signing

from myapp.conf import setting
from myapp.events import validate_channel
from myapp.exceptions import InvalidEvent

__all__ = ["subscription_token", "verify_token", "validate_granted", "InvalidToken", "MAX_TOKEN_LENGTH"]

_SALT = "myapp.subscription-token"
#: Characters of the longest token accepted; longer ones are refused before
#: their signature is checked (InvalidToken "token too long": a 401).
MAX_TOKEN_LENGTH = 4096


class InvalidToken(Exception):
    """The token is forged, malformed, too long or expired."""


def subscription_token(channels, *, max_age=None):
    """Return a token (str) granting a stream on ``channels``.

    channels: a list (or other iterable, not a str) of one or more channel
        names (str), each 1 to MYAPP_MAX_CHANNEL_LENGTH characters from
        ``myapp.events.CHANNEL_CHARS``.
    max_age: seconds the token stays valid (default MYAPP_TOKEN_MAX_AGE_SECONDS).

    Raise InvalidEvent (naming the rule) if ``channels`` is a str, is empty,
    or holds an invalid name.
    """
    if isinstance(channels, (str, bytes)):
        raise InvalidEvent(f"channels must be a list of channel names, not a {type(channels).__name__}")
    channels = list(channels)
    validate_granted(channels)
    max_age = setting("MYAPP_TOKEN_MAX_AGE_SECONDS") if max_age is None else max_age
    return signing.dumps({"c": channels, "e": int(time.time() + max_age)}, salt=_SALT, compress=True)


def validate_granted(channels):
    """Raise InvalidEvent unless ``channels`` (list) is a channel list a token may grant.

    One or more names, each valid for ``myapp.events.validate_channel`` with
    MYAPP_MAX_CHANNEL_LENGTH.
    """
    if not channels:
        raise InvalidEvent("a subscription token must grant at least one channel")
    max_length = setting("MYAPP_MAX_CHANNEL_LENGTH")
    for channel in channels:
        validate_channel(channel, max_length=max_length)


def verify_token(token):
    """Return the list of channels (str) a token grants, as signed.

    Raise InvalidToken if it is longer than MAX_TOKEN_LENGTH, its signature
    does not match SECRET_KEY, its content is malformed (not a list of str
    and an int expiry), or it expired. The names themselves are not checked
    here: ``validate_granted`` does (``myapp.auth.grant_stream`` calls it).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    try:
        payload = signing.loads(token, salt=_SALT)
    except (signing.BadSignature, ValueError, UnicodeError):
        raise InvalidToken("bad signature") from None
    if not isinstance(payload, dict):
        raise InvalidToken("malformed token")
    channels, expires = payload.get("c"), payload.get("e")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels) or not isinstance(expires, int):
        raise InvalidToken("malformed token")
    if expires < time.time():
        raise InvalidToken("token expired")
    return channels
