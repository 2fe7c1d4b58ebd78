"""``POST /api/events/``: the publish API for publishers that are not Python.

Request: ``Authorization: Bearer <token>`` (one of MYAPP_PUBLISH_TOKENS),
``Content-Type: application/json``, a body of at most
MYAPP_PUBLISH_MAX_BODY_BYTES bytes::

    {"channel": "room:lobby", "event_type": "chat.message",
     "data": {"text": "hi"}, "id": "optional-publisher-id", "raw": false}

The body comes with ``Content-Length`` or ``Transfer-Encoding: chunked``.
Either way at most MYAPP_PUBLISH_MAX_BODY_BYTES + 1 bytes are read: a larger
Content-Length is refused unread, a longer chunked body as soon as that many
bytes have arrived. A chunked body is read from ``wsgi.input`` (Django reads
nothing without a Content-Length), which only servers that set
``wsgi.input_terminated`` (gunicorn, mod_wsgi) de-chunk and end at the body's
end; elsewhere (Django's runserver) a chunked body gets 411. A request with
neither header has an empty body (RFC 9112 6.3).

Answers: 200 ``{"id": "<event id>"}``; 400 with ``{"error": reason}`` for an
empty body, a body that cannot be read (malformed chunks, a disconnect),
malformed JSON, invalid UTF-8, wrong types, unknown fields or invalid names;
401 without a bearer token; 403 for a wrong one (or when no token is
configured); 405 for other methods; 411 for a chunked body the server cannot
end; 413 for an over-size body or event; 415 for another content type;
503 + Retry-After when the broker is down. Never a 500.
"""

import json
import logging

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from myapp.conf import setting
from myapp.exceptions import BrokerUnavailable, EventTooLarge, InvalidEvent
from myapp.publish import send_event

from .bearer import bearer_token, token_matches
from .responses import error, unavailable

__all__ = ["publish"]

log = logging.getLogger("myapp.views")

_FIELDS = {"channel": str, "event_type": str, "data": object, "id": (str, type(None)), "raw": bool}
_REQUIRED = ("channel", "event_type", "data")


class _LengthRequired(Exception):
    """The body is chunked and the server cannot tell where it ends."""


def _read_body(request, limit):
    """Return the body (bytes), or None if it is longer than ``limit`` bytes.

    Read at most ``limit`` + 1 bytes: from Django's request for a
    Content-Length body (a larger Content-Length is not read at all), from
    ``wsgi.input`` for a body sent with Transfer-Encoding, which Django does
    not read (it is capped by CONTENT_LENGTH, absent here). Raise
    _LengthRequired for such a body when the server does not end
    ``wsgi.input`` at the body's end (no ``wsgi.input_terminated``, PEP 3333
    leaves it to the server): there it would be the raw connection. Let the
    server's errors for an unreadable body (malformed chunks, a disconnect)
    propagate.
    """
    meta = request.META
    if meta.get("HTTP_TRANSFER_ENCODING"):
        if not meta.get("wsgi.input_terminated"):
            raise _LengthRequired
        stream = meta["wsgi.input"]
    else:
        try:
            length = int(meta.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            return None
        stream = request
    body = bytearray()
    while len(body) <= limit:
        # read(n) may return fewer than n bytes before the end (PEP 3333).
        data = stream.read(limit + 1 - len(body))
        if not data:
            break
        body += data
    return None if len(body) > limit else bytes(body)


@csrf_exempt  # authenticated by a bearer token, not a cookie: CSRF cannot apply
def publish(request):
    """Publish one event from a JSON body."""
    if request.method != "POST":
        return error(405, "use POST", {"Allow": "POST"})
    token = bearer_token(request)
    if token is None:
        return error(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="publish"'})
    if not token_matches(token, setting("MYAPP_PUBLISH_TOKENS")):
        return error(403, "invalid publish token")
    content_type = request.content_type or ""
    if content_type != "application/json":
        return error(415, "Content-Type must be application/json")
    limit = setting("MYAPP_PUBLISH_MAX_BODY_BYTES")
    try:
        body = _read_body(request, limit)
    except _LengthRequired:
        return error(411, "this server cannot read a chunked body here: send the body with a Content-Length")
    except Exception as failure:  # noqa: BLE001 - the server's own errors (gunicorn's are not OSErrors)
        log.info("publish API: the body could not be read: %s: %s", type(failure).__name__, failure)
        return error(400, "the body could not be read (malformed chunked encoding or an early end)")
    if body is None:
        return error(413, f"the body is larger than {limit} bytes (MYAPP_PUBLISH_MAX_BODY_BYTES)")
    if not body:
        return error(400, "the body is empty: send a JSON object with Content-Length or Transfer-Encoding: chunked")
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
