"""Direct writes: the hub sends an event straight to an idle stream's socket.

Waking an idle stream's greenlet for every event costs a greenlet switch, a
pass through Django's and gunicorn's response code and gevent's ``sendall``
(which asks the kernel for the socket's buffer size each time), all to write
a few dozen bytes. So while a stream waits with nothing queued (it is
*parked* in ``myapp.hub.Subscription.get``), the hub writes each event's bytes
itself with one non-blocking ``send`` and the greenlet sleeps on. If the
socket takes only part of them (a slow client), the rest goes to the stream's
greenlet, which writes it before anything else; the stream is then queued as
usual until it parks again. Bytes leave in exactly the order they would
otherwise, as one greenlet at a time writes to a socket.

Direct writes are used only where the bytes on the wire are known exactly
(``sink_for``): gunicorn's own plain socket (TCP or unix, never TLS), HTTP/1.1
(each frame in one chunk of the chunked transfer coding, RFC 9112 section 7.1)
or HTTP/1.0 (raw bytes), no ``Content-Encoding`` on the response (a
compressing middleware rewrites the body), and ``MYAPP_DIRECT_WRITES`` on.
Turn the setting off behind gunicorn's ``uwsgi`` protocol or a WSGI
middleware that rewrites bodies. gunicorn's access log then counts only the
bytes it wrote itself.

Imports no Django; the view decides with ``sink_for``.
"""

import socket
import sys

__all__ = ["Sink", "sink_for", "chunk", "os_socket"]

_PLAIN_FAMILIES = {socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", None)}


def chunk(frame):
    """Return ``frame`` (bytes) as one chunk of HTTP/1.1's chunked transfer coding."""
    return b"%X\r\n%b\r\n" % (len(frame), frame)


class Sink:
    """A stream's socket, for non-blocking writes from the hub.

    sock: the connection's socket: a gevent socket, or a standard
        ``socket.socket`` in blocking mode without a timeout (``send`` passes
        MSG_DONTWAIT, so it still never blocks).
    chunked: True if the response body uses the chunked transfer coding
        (HTTP/1.1), so every write is one chunk; False for raw bytes.
    """

    __slots__ = ("sock", "chunked", "_send")

    def __init__(self, sock, *, chunked):
        self.sock = sock
        self.chunked = chunked
        # Not gevent's own send, which would wait for the socket to drain:
        # the hub must never wait.
        self._send = os_socket(sock).send

    def send(self, data):
        """Send what the socket takes at once of ``data`` (bytes) and return its length in bytes.

        Returns 0 when the socket's buffer is full. Never blocks. Raise
        OSError (e.g. BrokenPipeError, ConnectionResetError) when the
        connection is gone.
        """
        try:
            return self._send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def sendall(self, data):
        """Send all of ``data`` (bytes), waiting (cooperatively under gevent) while the client is slow.

        Raise OSError if the connection fails meanwhile.
        """
        self.sock.sendall(data)


def sink_for(environ, *, enabled=True):
    """Return a ``Sink`` for the stream that answers this WSGI request, or None for no direct writes.

    environ: the WSGI environ (``request.META`` in Django).
    enabled: the ``MYAPP_DIRECT_WRITES`` setting.

    None unless the server is gunicorn with its socket in the environ, the
    socket is a plain TCP or unix socket (not TLS) without a timeout at the
    OS-socket level (a timeout would make even a MSG_DONTWAIT send wait for
    room first), and the protocol is HTTP/1.1 or HTTP/1.0.
    """
    if not enabled or not environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
        return None
    sock = environ.get("gunicorn.socket")
    if sock is None or type(sock) not in _plain_socket_types():
        return None
    protocol = environ.get("SERVER_PROTOCOL")
    if protocol not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    raw = os_socket(sock)
    try:
        if raw.family not in _PLAIN_FAMILIES or raw.gettimeout() not in (None, 0.0):
            return None
    except OSError:
        return None
    return Sink(sock, chunked=protocol == "HTTP/1.1")


def os_socket(sock):
    """Return the OS-level socket object of ``sock``: gevent's socket wraps it in ``_sock``; a standard one is its own.

    Its methods never wait cooperatively: a non-blocking call raises
    BlockingIOError instead of parking the greenlet.
    """
    return getattr(sock, "_sock", sock)


def _plain_socket_types():
    types = {socket.socket}
    gevent_socket = sys.modules.get("gevent.socket")
    if gevent_socket is not None:
        types.add(gevent_socket.socket)
    return types
