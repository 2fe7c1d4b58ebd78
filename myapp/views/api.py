"""``POST /api/events/``: the publish API for publishers that are not Python.

Request: ``Authorization: Bearer <token>`` (one of MYAPP_PUBLISH_TOKENS),
``Content-Type: application/json``, a body of at most
MYAPP_PUBLISH_MAX_BODY_BYTES bytes::

    {"channel": "room:lobby", "event_type": "chat.message",
     "data": {"text": "hi"}, "id": "optional-publisher-id", "raw": false}

Answers: 200 ``{"id": "<event id>"}``; 400 with ``{"error": reason}`` for
malformed JSON, wrong types, unknown fields or invalid names; 401 without a
bearer token; 403 for a wrong one (or when no token is configured); 405 for
other methods; 413 for an over-size body or event; 415 for another content
type; 503 + Retry-After when the broker is down. Never a 500.
"""

import hmac
import json
import logging

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from myapp.conf import setting
from myapp.exceptions import BrokerUnavailable, EventTooLarge, InvalidEvent
from myapp.publish import send_event

from .responses import error, unavailable

__all__ = ["publish"]

log = logging.getLogger("myapp.views")

_FIELDS = {"channel": str, "event_type": str, "data": object, "id": (str, type(None)), "raw": bool}
_REQUIRED = ("channel", "event_type", "data")


def _token_matches(given):
    """Compare ``given`` with every configured token in constant time."""
    given = given.encode("utf-8", "surrogateescape")
    matched = False
    for token in setting("MYAPP_PUBLISH_TOKENS"):
        # No early exit: the time taken does not depend on which token matched.
        matched |= hmac.compare_digest(given, token.encode("utf-8"))
    return matched


def _bearer(request):
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _read_body(request, limit):
    """Return the body (bytes), or None if it is longer than ``limit`` bytes."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        return None
    body = request.read(limit + 1)
    return None if len(body) > limit else body


@csrf_exempt  # authenticated by a bearer token, not a cookie: CSRF cannot apply
def publish(request):
    """Publish one event from a JSON body."""
    if request.method != "POST":
        return error(405, "use POST", {"Allow": "POST"})
    token = _bearer(request)
    if token is None:
        return error(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="publish"'})
    if not _token_matches(token):
        return error(403, "invalid publish token")
    content_type = request.content_type or ""
    if content_type != "application/json":
        return error(415, "Content-Type must be application/json")
    limit = setting("MYAPP_PUBLISH_MAX_BODY_BYTES")
    body = _read_body(request, limit)
    if body is None:
        return error(413, f"the body is larger than {limit} bytes (MYAPP_PUBLISH_MAX_BODY_BYTES)")
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return error(400, "the body is not valid UTF-8")
    except (ValueError, RecursionError):
        return error(400, "the body is not valid JSON")
    if not isinstance(payload, dict):
        return error(400, "the body must be a JSON object")
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        return error(400, f"unknown fields: {', '.join(unknown)[:200]}")
    for name in _REQUIRED:
        if name not in payload:
            return error(400, f"missing field: {name}")
    for name, kind in _FIELDS.items():
        if name in payload and not isinstance(payload[name], kind):
            return error(400, f"field {name} has the wrong type")
    try:
        event_id = send_event(
            payload["channel"],
            payload["event_type"],
            payload["data"],
            id=payload.get("id"),
            raw=payload.get("raw", False),
        )
    except EventTooLarge as failure:
        return error(413, str(failure))
    except InvalidEvent as failure:
        return error(400, str(failure))
    except BrokerUnavailable as failure:
        log.warning("publish API: broker unavailable: %s", failure)
        return unavailable("the event broker is unavailable; retry later")
    return JsonResponse({"id": event_id})
