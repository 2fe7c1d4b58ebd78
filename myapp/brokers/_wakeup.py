"""A self-pipe that lets any greenlet interrupt a listener waiting on its socket."""

import os
import select
import sys

__all__ = ["Waker"]


class Waker:
    """One pipe: ``wakeup()`` from anywhere makes a pending ``wait()`` return.

    Under gevent (the process patched), two libev read watchers, on the
    socket and on the pipe, stay started for the listener's whole life, and
    ``wait`` parks the greenlet on a ``gevent.hub.Waiter``: a wake-up then
    costs no watcher set-up and no ``epoll_ctl`` (stopping and restarting a
    watcher between two loop iterations costs libev two system calls), unlike
    ``select.select`` (which gevent patches into new watchers on every call).
    Readiness that arrives while nobody waits is remembered; the socket's
    watcher then pauses until the next ``wait``, so unread data cannot make
    the loop spin. A caller that also reads the socket itself between two
    waits (queries on the same connection) makes that remembered readiness
    stale: it calls ``clear`` once it has consumed what was there, or every
    ``wait`` after a query would return at once. Without gevent,
    ``select.select`` waits.
    """

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._hub = _gevent_hub()
        self._watchers = None  # (fd, socket watcher, pipe watcher) under gevent
        self._waiter = None  # the gevent Waiter of a pending wait
        self._ready = False  # the socket turned readable while nobody waited

    def wakeup(self):
        try:
            os.write(self._write, b"!")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the reader; a closed one has no reader

    def clear(self):
        """Forget readiness noticed while nobody waited (the caller read the socket since).

        Data that is still unread makes the next ``wait`` return at once all
        the same: its watcher is level-triggered.
        """
        self._ready = False

    def wait(self, fd, timeout):
        """Wait until ``fd`` is readable, ``wakeup`` is called, or ``timeout`` seconds pass.

        timeout: seconds (float), or None to wait without limit.
        Return True if ``fd`` is readable.
        """
        if self._hub is not None:
            return self._wait_gevent(fd, timeout)
        readable, _, _ = select.select([fd, self._read], [], [], timeout)
        if self._read in readable:
            self._drain()
        return fd in readable

    def wait_any(self, fds, timeout):
        """Wait until one of ``fds`` is readable, ``wakeup`` is called, or ``timeout`` seconds pass.

        timeout: seconds (float), or None to wait without limit. Return the
        readable ones among ``fds`` (list). ``select.select`` waits (gevent's
        cooperative one once gevent patched the process): it sets up watchers
        on every call, which a listener on a few connections can afford.
        """
        readable, _, _ = select.select([*fds, self._read], [], [], timeout)
        if self._read in readable:
            self._drain()
            readable.remove(self._read)
        return readable

    def _wait_gevent(self, fd, timeout):
        from gevent.hub import Waiter

        hub = self._hub
        if self._watchers is None or self._watchers[0] != fd:
            self._close_watchers()
            self._watchers = (fd, hub.loop.io(fd, 1), hub.loop.io(self._read, 1))
            self._watchers[2].start(self._on_pipe)
            self._ready = False
        on_socket = self._watchers[1]
        if not on_socket.active:
            on_socket.start(self._on_socket)
        if self._ready:
            self._ready = False
            return True
        self._waiter = waiter = Waiter(hub)
        timer = None
        if timeout is not None:
            timer = hub.loop.timer(max(timeout, 0.0))
            timer.start(waiter.switch, False)
        try:
            readable = waiter.get()
        finally:
            self._waiter = None
            if timer is not None:
                timer.close()
        self._ready = False
        return readable is True

    def _on_socket(self):
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(True)
        else:
            self._ready = True
            self._watchers[1].stop()  # level-triggered: resumes at the next wait

    def _on_pipe(self):
        self._drain()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(False)

    def _drain(self):
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _close_watchers(self):
        if self._watchers is not None:
            for watcher in self._watchers[1:]:
                watcher.close()
            self._watchers = None

    def close(self):
        self._close_watchers()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


def _gevent_hub():
    """The gevent hub of this thread if gevent patched the process, else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return None
    import gevent

    return gevent.get_hub()
