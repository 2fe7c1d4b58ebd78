"""Adopted streams: under gunicorn's gevent worker the hub takes over a started stream's connection.

A stream served the usual way keeps a greenlet (and gunicorn's request, the
WSGI environ, Django's response) for its whole life, only to wait: the hub
already writes its events and heartbeats to the socket directly
(``myapp.sink``). Adoption drops all of that. Once the view has answered,
``adopting`` (a WSGI wrapper that ``myapp.gunicorn`` installs in each gevent
worker) writes the response head and the stream's first frames itself, hands
a duplicate of the connection's file descriptor to the hub, tells gunicorn
that the request was handled and the connection must not be reused, and
returns: the greenlet ends and gunicorn closes its own descriptor, while the
connection lives on in the hub. An idle stream is then a socket and a
``myapp.subscription.Subscription``: a few hundred bytes of Python objects.

On the wire the response is what gunicorn would have sent: the chunked
coding for HTTP/1.1 (one chunk per write, RFC 9112 section 7.1; clients that
read a body as it arrives rely on it), raw bytes for HTTP/1.0, and
``Connection: close``, as the connection is not reused. The hub writes
everything from then on: events, heartbeats, resets, the last block and the
last chunk when the stream ends (a deploy, its lifetime), and closes the
socket.
A socket that cannot take a write waits in the hub's epoll set for room
(``myapp.hangups``); a client that stays too slow overflows its queue, as a
greenlet stream would.

A stream is adopted only where the bytes on the wire are known exactly: the
view found gunicorn's plain socket and MYAPP_DIRECT_WRITES on (it set
``response.myapp_stream``), the request is a GET over HTTP/1.1 or 1.0, and
no middleware gave the response a ``Content-Encoding``. Any other response
passes through untouched. gunicorn's access log does not list adopted
streams (gunicorn logs a request when it writes the response).

Sources: PEP 3333 (WSGI); gunicorn's ``workers/base_async.py``
(``ALREADY_HANDLED``, the keep-alive loop, ``Request.must_close``).
"""

import _socket
import logging
import os
from email.utils import formatdate

from myapp.sink import chunk

__all__ = ["adopting"]

log = logging.getLogger("myapp.adoption")

_PROTOCOLS = ("HTTP/1.1", "HTTP/1.0")


def adopting(app, already_handled):
    """Return a WSGI application that serves ``app`` and lets the hub adopt its streams.

    app: the WSGI application (Django's ``WSGIHandler``).
    already_handled: the value gunicorn's async workers take as "the
        application wrote the response itself" (``ALREADY_HANDLED`` of
        ``gunicorn.workers.base_async``).
    """

    def application(environ, start_response):
        headers = []

        def capture(status, response_headers, exc_info=None):
            headers[:] = [status, response_headers]
            return start_response(status, response_headers, exc_info)

        response = app(environ, capture)
        stream = getattr(response, "myapp_stream", None)
        if stream is None or not headers or not _adoptable(environ, headers[1]):
            return response
        request = getattr(getattr(start_response, "__self__", None), "req", None)
        if request is None or not hasattr(request, "must_close"):
            return response  # not gunicorn's Response: serve it the usual way
        sock = environ["gunicorn.socket"]
        chunked = environ["SERVER_PROTOCOL"] == "HTTP/1.1"
        first = stream.first_bytes()
        try:
            sock.sendall(_head(environ["SERVER_PROTOCOL"], *headers, chunked) + (chunk(first) if chunked else first))
        except OSError:
            response.close()
            raise
        raw = _socket.socket(fileno=os.dup(sock.fileno()))
        raw.setblocking(False)
        request.must_close = True  # gunicorn's keep-alive loop stops and closes its descriptor
        stream.adopt(raw, chunked=chunked)
        response.close()
        return already_handled

    return application


def _adoptable(environ, response_headers):
    if environ.get("REQUEST_METHOD") != "GET" or environ.get("SERVER_PROTOCOL") not in _PROTOCOLS:
        return False
    return not any(name.lower() == "content-encoding" for name, _ in response_headers)


_HOP_BY_HOP = ("connection", "transfer-encoding", "content-length")


def _head(protocol, status, response_headers, chunked):
    """The response head (bytes) for an adopted stream: the app's status and headers, closed by the server."""
    lines = [f"{protocol} {status}"]
    lines.extend(f"{name}: {value}" for name, value in response_headers if name.lower() not in _HOP_BY_HOP)
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("Connection: close")
    lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
