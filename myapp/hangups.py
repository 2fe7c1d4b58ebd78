"""Noticing that a client closed its connection, for every open stream, at once.

gunicorn never reads a socket while its response runs, so a client that
closes its ``EventSource`` (a page navigated away) would be noticed only when
a later write fails: at the next heartbeat, seconds later, while its slot in
the per-user limit, its greenlet and its file descriptor stay taken.

So the hub watches every stream's socket in one ``epoll`` set (Linux) for
``EPOLLRDHUP`` (the client's FIN), ``EPOLLHUP`` and ``EPOLLERR`` (an RST):
no timer and no system call per stream while nothing happens, one
registration (kernel memory, not process memory) per stream. Data a client
sends does not wake the set (EPOLLIN is not asked for).

When the set reports a socket, one ``recv(MSG_PEEK | MSG_DONTWAIT)`` confirms
the hang-up (zero bytes: FIN; an error: RST) before the stream is closed, so
a report about a descriptor that was closed and reused meanwhile never
closes the wrong stream. Elsewhere (no epoll) nothing is watched and a
closed connection is noticed at the next write, as before.

Source: epoll(7) and epoll_ctl(2) for EPOLLRDHUP (Linux 2.6.17+).
"""

import socket
import sys

from myapp.sink import os_socket

__all__ = ["Hangups"]

try:
    import select as _select

    _MASK = _select.EPOLLRDHUP | _select.EPOLLHUP | _select.EPOLLERR
except (ImportError, AttributeError):  # not Linux
    _MASK = None

_PEEK = getattr(socket, "MSG_PEEK", 0) | getattr(socket, "MSG_DONTWAIT", 0)


def _epoll_class():
    """``select.epoll`` as it was before gevent patched ``select`` (which removes it), or None."""
    if _MASK is None:
        return None
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "epoll")
    return getattr(_select, "epoll", None)


class Hangups:
    """One epoll set watching the sockets of a hub's streams for a client's hang-up.

    ``watch`` and ``forget`` are called with the hub's lock held; ``wait``
    runs in the hub's own thread (a greenlet under gevent) and ``hung_up``
    with the lock held again, so a descriptor cannot be closed and reused
    between the two without ``hung_up`` noticing.
    """

    __slots__ = ("_epoll", "_watched", "_greenlets")

    def __init__(self):
        epoll = _epoll_class()
        self._epoll = epoll() if epoll is not None else None
        self._watched = {}  # fd -> (socket, subscription)
        monkey = sys.modules.get("gevent.monkey")
        self._greenlets = monkey is not None and monkey.is_module_patched("select")

    @property
    def available(self):
        """True if hang-ups are noticed here (Linux epoll)."""
        return self._epoll is not None

    def __len__(self):
        return len(self._watched)

    def watch(self, sock, subscription):
        """Start watching ``sock`` (a socket, gevent's or the standard one) for ``subscription``.

        Return its fd (int), or None if it is not watched (no epoll here, or
        the socket is closed already).
        """
        if self._epoll is None:
            return None
        try:
            fd = sock.fileno()
            self._epoll.register(fd, _MASK)
        except (OSError, ValueError):
            return None  # already closed: the stream's next write notices
        self._watched[fd] = (os_socket(sock), subscription)
        return fd

    def forget(self, fd):
        """Stop watching ``fd`` (an int from ``watch``). Safe to call twice."""
        if self._watched.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def wait(self, timeout):
        """Wait up to ``timeout`` seconds (float) for a report; return the reported fds (list of int).

        Cooperative under gevent (the epoll descriptor is waited on like a
        socket); a blocking ``epoll.poll`` in a real thread otherwise.
        """
        if self._epoll is None:
            return []
        if self._greenlets:
            from gevent.socket import wait_read

            try:
                wait_read(self._epoll.fileno(), timeout)
            except TimeoutError:
                return []
            except OSError:
                return []  # closed by stop()
            timeout = 0
        try:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        except (OSError, ValueError):
            return []

    def hung_up(self, fd):
        """Return the subscription whose client closed ``fd``, or None (a stale or spurious report).

        A confirmed hang-up is forgotten; a socket that has data to read
        instead (a client sending bytes mid-stream) is no longer watched.
        """
        entry = self._watched.get(fd)
        if entry is None:
            return None
        sock, subscription = entry
        try:
            data = sock.recv(1, _PEEK)
        except BlockingIOError:
            return None  # nothing: the descriptor was reused by a live connection
        except OSError:
            data = b""  # reset by the client
        self.forget(fd)
        return subscription if not data else None

    def close(self):
        """Stop watching everything and close the epoll set."""
        self._watched.clear()
        if self._epoll is not None:
            self._epoll.close()
