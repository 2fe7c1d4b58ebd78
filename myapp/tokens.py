"""Signed, expiring subscription tokens (Django's ``signing``).

A token names the channels it grants and when it expires. Pages opened from
another origin, or anonymous pages (a public status board), pass it to the
stream as ``?token=...``. It is a bearer credential until it expires: keep
lifetimes short and issue tokens only over HTTPS to whom may read the
channels.
"""

import time

from django.core import signing

from myapp.conf import setting

__all__ = ["subscription_token", "verify_token", "InvalidToken", "MAX_TOKEN_LENGTH"]

_SALT = "myapp.subscription-token"
#: Characters of the longest token accepted; longer ones are refused before
#: their signature is checked (InvalidToken "token too long": a 401).
MAX_TOKEN_LENGTH = 4096


class InvalidToken(Exception):
    """The token is forged, malformed, too long or expired."""


def subscription_token(channels, *, max_age=None):
    """Return a token (str) granting a stream on ``channels``.

    channels: list of channel names (str), validated by the stream on use.
    max_age: seconds the token stays valid (default MYAPP_TOKEN_MAX_AGE_SECONDS).
    """
    max_age = setting("MYAPP_TOKEN_MAX_AGE_SECONDS") if max_age is None else max_age
    return signing.dumps({"c": list(channels), "e": int(time.time() + max_age)}, salt=_SALT, compress=True)


def verify_token(token):
    """Return the list of channels a token grants.

    Raise InvalidToken if it is longer than MAX_TOKEN_LENGTH, its signature
    does not match SECRET_KEY, its content is malformed, or it expired.
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
