"""``GET /events/``: the SSE stream view.

Answers (each one stops a native EventSource from retrying, except 200):

- 200 ``text/event-stream``: the stream (see ``myapp.stream``);
- 204: every requested channel has ended for good (WHATWG HTML 9.2.3);
- 400: a malformed or over-limit ``channel`` parameter, or a signed
  subscription token granting no channel or an invalid name;
- 401: not logged in and no valid (well-signed, well-formed, unexpired)
  subscription token;
- 403: a channel the requester may not read, or a refused Origin;
- 429 + Retry-After: the user already holds MYAPP_MAX_STREAMS_PER_USER streams here;
- 503 + Retry-After: the broker (or the database the session needs) is unreachable.

``?check=1`` answers the same statuses without streaming (200 JSON when a
stream would open), so a client can tell "retry later" from "stop".

Resume point: the ``Last-Event-ID`` header, else ``?lastEventId=`` (for first
connections and polyfills); an empty one is absent (a fresh stream, not a
reset), one over MAX_LAST_EVENT_ID characters is malformed (``stream.reset``).
"""

import logging
import socket

from django.db import DatabaseError, connections
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from myapp.auth import StreamRefused, grant_stream
from myapp.conf import setting
from myapp.cors import ORIGIN_REFUSED, cors_headers, preflight_headers
from myapp.exceptions import BrokerUnavailable
from myapp.hub import TooManyStreams, get_hub
from myapp.sink import sink_for
from myapp.stream import open_stream

from .responses import error, unavailable

__all__ = ["events"]

log = logging.getLogger("myapp.views")

#: Longest Last-Event-ID we try to parse (characters); longer ones reset.
MAX_LAST_EVENT_ID = 256


def events(request):
    """Stream the requester's channels as server-sent events."""
    cors = cors_headers(request)
    if cors is ORIGIN_REFUSED:
        return error(403, "origin not allowed (MYAPP_CORS_ALLOWED_ORIGINS)")
    if request.method == "OPTIONS":
        response = HttpResponse(status=204)
        for name, value in preflight_headers(cors).items():
            response[name] = value
        return response
    if request.method != "GET":
        return error(405, "use GET", {"Allow": "GET, OPTIONS", **cors})

    try:
        grant = grant_stream(request, request.GET.getlist("channel"), request.GET.get("token"))
    except StreamRefused as refused:
        headers = {"WWW-Authenticate": 'Bearer realm="events"'} if refused.status == 401 else {}
        return error(refused.status, refused.reason, {**headers, **cors})
    except DatabaseError as failure:
        # The session, the user or an authorizer needs the database (with the
        # PostgreSQL broker it is also the broker): tell the browser to retry.
        log.warning("stream refused: database unavailable: %s", failure)
        return unavailable("the database is unavailable; retry later", headers=cors)
    if not grant.channels:
        response = HttpResponse(status=204)
        for name, value in cors.items():
            response[name] = value
        return response

    if "check" in request.GET:
        # The page script asks this after EventSource gave up, to tell "retry
        # later" (503, 429) from "stop" (204, 401, 403) without opening a stream.
        hub = get_hub()
        if not hub.available():
            return unavailable("the event broker is unavailable; retry later", headers=cors)
        if hub.at_limit(grant.key):
            return unavailable("too many streams for this user", status=429, headers=cors)
        return JsonResponse({"channels": list(grant.channels)}, headers=cors)

    # An empty value (header or query) means none, as for a browser, which sends
    # the header only when its last event id is non-empty (WHATWG HTML 9.2.3,
    # reestablishing the connection).
    last_event_id = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId") or None
    if last_event_id is not None and len(last_event_id) > MAX_LAST_EVENT_ID:
        last_event_id = "malformed"  # parse() refuses it: the stream resets

    try:
        stream = open_stream(
            get_hub(),
            grant.channels,
            last_event_id,
            owner=grant.key,
            retry_ms=setting("MYAPP_RETRY_MILLISECONDS"),
            lifetime=setting("MYAPP_STREAM_LIFETIME_SECONDS"),
        )
    except BrokerUnavailable as failure:
        log.debug("stream refused: %s", failure)
        return unavailable("the event broker is unavailable; retry later", headers=cors)
    except TooManyStreams as failure:
        return unavailable(str(failure), status=429, headers=cors)

    # Session and auth lookups opened a database connection; a stream must
    # not hold it (nor its wrapper, a few KB per greenlet) for hours.
    for connection in connections.all(initialized_only=True):
        connection.close()
        del connections[connection.alias]
    sock = request.META.get("gunicorn.socket")
    _bound_blocked_writes(sock)

    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    for name, value in cors.items():
        response[name] = value
    sink = sink_for(request.META, enabled=setting("MYAPP_DIRECT_WRITES"))
    stream.attach(response, sink=sink, sock=sock, request=request)
    return response


def _bound_blocked_writes(sock):
    """Drop the connection of a client that stops reading for MYAPP_SEND_TIMEOUT_SECONDS.

    On TCP the kernel enforces it (TCP_USER_TIMEOUT, Linux: unacknowledged
    data, zero-window probes included), so each write stays a plain send;
    elsewhere a socket timeout does.
    """
    if sock is None:
        return
    timeout = setting("MYAPP_SEND_TIMEOUT_SECONDS")
    if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
    else:
        sock.settimeout(timeout)
