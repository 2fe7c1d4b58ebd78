"""``GET /events/``: the SSE stream view.

Answers (each one stops a native EventSource from retrying, except 200):

- 200 ``text/event-stream``: the stream (see ``myapp.stream``);
- 204: every requested channel has ended for good (WHATWG HTML 9.2.3);
- 400: a malformed or over-limit ``channel`` parameter, or a signed
  subscription token granting no channel or an invalid name;
- 401: not logged in and no valid (well-signed, well-formed, unexpired)
  subscription token;
- 403: a channel the requester may not read, or a refused Origin;
- 429 + Retry-After: the user already holds MYAPP_MAX_STREAMS_PER_USER streams;
- 503 + Retry-After: this worker holds MYAPP_MAX_STREAMS_PER_WORKER streams;
- 503 + Retry-After: the broker (or the database the session needs) is unreachable.

``?check=1`` answers the same statuses without streaming (200 JSON when a
stream would open), so a client can tell "retry later" from "stop".

Resume point: the ``Last-Event-ID`` header, else ``?lastEventId=`` (for first
connections and polyfills); an empty one is absent (a fresh stream, not a
reset); one that is not an id of ours, over-long included, is malformed
(``stream.reset``, see ``myapp.resume``).
"""

import logging
import socket
import threading
from collections import Counter

from django.conf import settings
from django.db import DatabaseError, connections
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from myapp.auth import Grant, StreamRefused, grant_stream
from myapp.conf import setting
from myapp.cors import ORIGIN_REFUSED, cors_headers, preflight_headers
from myapp.exceptions import BrokerUnavailable
from myapp.hub import TooManyStreams, WorkerFull, get_hub
from myapp.sink import sink_for
from myapp.stream import open_stream

from .responses import error, unavailable

__all__ = ["events"]

log = logging.getLogger("myapp.views")


class SessionStreams:
    """Stream requests per session cookie in this process (being opened, or open), capped at the per-user limit.

    A session belongs to one user, so a session holding
    MYAPP_MAX_STREAMS_PER_USER streams means its user does too: a request
    past that is answered 429 before its session and user are loaded. A
    burst of stream requests from one page (a reload loop, a bug) then costs
    the worker a few database reads per allowed stream instead of a session
    and a user lookup per request, during which every other request of the
    worker waits.
    """

    def __init__(self):
        self._counts = Counter()
        self._lock = threading.Lock()

    def reserve(self, key, limit):
        """Count one more stream request of session ``key`` (str, or None: not counted).

        limit: the most a session may hold (int), or None for no limit.
        Return the callable that gives the slot back (idempotent), or None
        if the session is at the limit.
        """
        if key is None or limit is None:
            return _nothing
        with self._lock:
            if self._counts[key] >= limit:
                return None
            self._counts[key] += 1
        done = []

        def release():
            if done:
                return
            done.append(True)
            with self._lock:
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]

        return release


def _nothing():
    pass


_sessions = SessionStreams()


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

    if "check" in request.GET:
        return _check(request, cors)
    limit = setting("MYAPP_MAX_STREAMS_PER_USER")
    release = _sessions.reserve(request.COOKIES.get(settings.SESSION_COOKIE_NAME), limit)
    if release is None:
        return unavailable(f"at most {limit} streams per user", status=429, headers=cors)
    response = None
    try:
        response = _stream(request, cors, release)
    finally:
        if type(response) is not StreamingHttpResponse:
            release()
    return response


def _grant(request, cors):
    """Return the Grant for ``request``, or the response that refuses it (4xx, 503, or 204 when all are GONE)."""
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
    return grant


def _check(request, cors):
    """``?check=1``: the status a stream request would get, without streaming.

    The page script asks this after EventSource gave up, to tell "retry
    later" (503, 429) from "stop" (204, 401, 403).
    """
    grant = _grant(request, cors)
    if not isinstance(grant, Grant):
        return grant
    hub = get_hub()
    try:
        if not hub.available():
            return unavailable("the event broker is unavailable; retry later", headers=cors)
        if hub.at_limit(grant.owner):
            return unavailable("too many streams for this user", status=429, headers=cors)
    except BrokerUnavailable:
        return unavailable("the event broker is unavailable; retry later", headers=cors)
    return JsonResponse({"channels": list(grant.channels)}, headers=cors)


def _stream(request, cors, release):
    """Open the stream; return its StreamingHttpResponse (which calls ``release`` when it ends) or a refusal."""
    grant = _grant(request, cors)
    if not isinstance(grant, Grant):
        return grant
    # An empty value (header or query) means none, as for a browser, which sends
    # the header only when its last event id is non-empty (WHATWG HTML 9.2.3,
    # reestablishing the connection). One that is not an id of ours (too long
    # included: myapp.ids.parse) resets.
    last_event_id = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId") or None
    try:
        stream = open_stream(
            get_hub(),
            grant.channels,
            last_event_id,
            owner=grant.owner,
            retry_ms=setting("MYAPP_RETRY_MILLISECONDS"),
            lifetime=setting("MYAPP_STREAM_LIFETIME_SECONDS"),
        )
    except BrokerUnavailable as failure:
        log.debug("stream refused: %s", failure)
        return unavailable("the event broker is unavailable; retry later", headers=cors)
    except TooManyStreams as failure:
        return unavailable(str(failure), status=429, headers=cors)
    except WorkerFull as failure:
        return unavailable(str(failure), headers=cors)
    stream.on_close(release)

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
    if sink is not None:
        response.myapp_stream = stream  # the hub may adopt the connection (myapp.adoption)
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
