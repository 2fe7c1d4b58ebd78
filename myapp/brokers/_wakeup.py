"""A self-pipe that lets any greenlet interrupt a listener waiting on its socket."""

import os
import select
import sys

__all__ = ["Waker"]


class Waker:
    """One pipe: ``wakeup()`` from anywhere makes a pending ``wait()`` return.

    Under gevent (the process patched), ``wait`` keeps two libev read
    watchers, on the socket and on the pipe, for the listener's whole life
    and parks the greenlet on a ``gevent.hub.Waiter``: a wake-up then costs
    no watcher set-up, unlike ``select.select`` (which gevent patches into
    new watchers on every call). Without gevent, ``select.select`` waits.
    """

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._hub = _gevent_hub()
        self._watchers = None  # (fd, socket watcher, pipe watcher) under gevent

    def wakeup(self):
        try:
            os.write(self._write, b"!")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the reader; a closed one has no reader

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

    def _wait_gevent(self, fd, timeout):
        from gevent.hub import Waiter

        hub = self._hub
        if self._watchers is None or self._watchers[0] != fd:
            self._close_watchers()
            self._watchers = (fd, hub.loop.io(fd, 1), hub.loop.io(self._read, 1))
        _, on_socket, on_pipe = self._watchers
        waiter = Waiter(hub)
        on_socket.start(waiter.switch, True)
        on_pipe.start(waiter.switch, False)
        timer = None
        if timeout is not None:
            timer = hub.loop.timer(max(timeout, 0.0))
            timer.start(waiter.switch, False)
        try:
            readable = waiter.get()
        finally:
            on_socket.stop()
            on_pipe.stop()
            if timer is not None:
                timer.close()
        if readable is not True:  # woken by the pipe (or the timer): empty it
            self._drain()
        return readable is True

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
