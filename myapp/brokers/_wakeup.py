"""A self-pipe that lets any greenlet interrupt a listener waiting on its socket."""

import os
import select

__all__ = ["Waker"]


class Waker:
    """One pipe: ``wakeup()`` from anywhere makes a pending ``wait()`` return.

    Under gevent, ``select.select`` is patched and waits cooperatively.
    """

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def wakeup(self):
        try:
            os.write(self._write, b"!")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the reader; a closed one has no reader

    def wait(self, fd, timeout):
        """Wait until ``fd`` is readable, ``wakeup`` is called, or ``timeout`` seconds pass.

        Return True if ``fd`` is readable.
        """
        readable, _, _ = select.select([fd, self._read], [], [], timeout)
        if self._read in readable:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass
        return fd in readable

    def close(self):
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
