"""Reading an authenticated JSON request body: the publish and control APIs share it.

Checks, in order: POST (405), a bearer token (401 without, 403 for one not in
MYAPP_PUBLISH_TOKENS), ``Content-Type: application/json`` (415), a body of
at most MYAPP_PUBLISH_MAX_BODY_BYTES bytes sent with Content-Length or
Transfer-Encoding: chunked (413 past it, 411 for a chunked body the server
cannot end, 400 if it cannot be read or is empty), UTF-8 JSON (400).
"""

import json
import logging

from myapp.conf import setting

from .bearer import bearer_token, token_matches
from .responses import error

__all__ = ["json_request"]

log = logging.getLogger("myapp.views")


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


def json_request(request):
    """Check method, token and content type, read and decode the body.

    Return ``(payload, None)`` with the decoded JSON value, or ``(None,
    response)`` with the error response to send.
    """
    if request.method != "POST":
        return None, error(405, "use POST", {"Allow": "POST"})
    token = bearer_token(request)
    if token is None:
        return None, error(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="publish"'})
    if not token_matches(token, setting("MYAPP_PUBLISH_TOKENS")):
        return None, error(403, "invalid publish token")
    content_type = request.content_type or ""
    if content_type != "application/json":
        return None, error(415, "Content-Type must be application/json")
    limit = setting("MYAPP_PUBLISH_MAX_BODY_BYTES")
    try:
        body = _read_body(request, limit)
    except _LengthRequired:
        return None, error(411, "this server cannot read a chunked body here: send the body with a Content-Length")
    except Exception as failure:  # noqa: BLE001 - the server's own errors (gunicorn's are not OSErrors)
        log.info("API: the body could not be read: %s: %s", type(failure).__name__, failure)
        return None, error(400, "the body could not be read (malformed chunked encoding or an early end)")
    if body is None:
        return None, error(413, f"the body is larger than {limit} bytes (MYAPP_PUBLISH_MAX_BODY_BYTES)")
    if not body:
        return None, error(
            400, "the body is empty: send a JSON object with Content-Length or Transfer-Encoding: chunked"
        )
    try:
        return json.loads(body.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, error(400, "the body is not valid UTF-8")
    except (ValueError, RecursionError):
        return None, error(400, "the body is not valid JSON")
