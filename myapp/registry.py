"""The process's shared objects (its broker, its hub), built lazily, once, and rebuilt after fork.

Under gunicorn they are built inside the worker, on first use (after gevent
patched the process), never at import. A burst of first requests builds
exactly one (a lock guards the build). A process forked from one that had
built them (gunicorn with ``preload_app``, a Celery prefork pool,
``multiprocessing``) builds its own on first use instead of sharing the
parent's connections: each object remembers the pid that built it.
"""

import os
import threading

__all__ = ["ProcessLocal"]


class ProcessLocal:
    """One object per process, built by ``build()`` on first ``get``.

    build: callable returning the object.
    discard: callable(obj) that releases an object being replaced or reset
        in the process that built it (e.g. closes connections), or None.
    usable: callable(obj) -> bool; an object that is no longer usable (a
        stopped hub) is replaced on the next ``get``. None means always.
    """

    __slots__ = ("_build", "_discard", "_usable", "_obj", "_pid", "_lock")

    def __init__(self, build, *, discard=None, usable=None):
        self._build = build
        self._discard = discard
        self._usable = usable
        self._obj = None
        self._pid = None
        self._lock = threading.Lock()

    def get(self):
        """Return this process's object, building it if there is none (or it is stale)."""
        obj = self._obj
        if obj is not None and self._pid == os.getpid() and (self._usable is None or self._usable(obj)):
            return obj
        with self._lock:
            obj = self._obj
            if obj is None or self._pid != os.getpid() or (self._usable is not None and not self._usable(obj)):
                if obj is not None and self._pid == os.getpid() and self._discard is not None:
                    self._discard(obj)
                obj = self._build()
                self._obj, self._pid = obj, os.getpid()
            return obj

    def peek(self):
        """Return this process's object if it was built here, else None (builds nothing)."""
        return self._obj if self._pid == os.getpid() else None

    def take(self):
        """Forget this process's object and return it (None if none was built here), without releasing it."""
        with self._lock:
            obj, pid = self._obj, self._pid
            self._obj = self._pid = None
        return obj if pid == os.getpid() else None

    def reset(self):
        """Forget the object; release it with ``discard`` if this process built it."""
        with self._lock:
            obj, pid = self._obj, self._pid
            self._obj = self._pid = None
        if obj is not None and pid == os.getpid() and self._discard is not None:
            self._discard(obj)
