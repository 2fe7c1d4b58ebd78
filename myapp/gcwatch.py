"""How long the cyclic garbage collector stops this process: measured with ``gc.callbacks``.

Every collection stops the whole worker (every stream and request) for as
long as it walks the tracked objects of its generations. ``install()`` adds a
callback that times each collection; ``stats()`` returns the counts and the
longest pause per generation since start (seconds). ``/healthz`` reports
them, and the benchmark reads them there.

``freeze()`` moves every object alive at start-up (modules, settings, the
URL resolver, Django's app registry: hundreds of thousands of objects) into
the permanent generation (``gc.freeze``, Python 3.7+), so full collections
walk only what streams and requests create afterwards. ``myapp.gunicorn``
calls both once a worker has loaded the application.

Source: Python docs, ``gc`` module (``callbacks``, ``freeze``).
"""

import gc
import time

__all__ = ["install", "freeze", "stats"]

_started = [None]
_frozen = [0]  # objects moved to the permanent generation by freeze()
_pauses = [[0, 0.0, 0.0] for _ in range(3)]  # per generation: collections, total seconds, longest seconds


def _callback(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
    elif _started[0] is not None:
        pause = time.perf_counter() - _started[0]
        _started[0] = None
        entry = _pauses[info["generation"]]
        entry[0] += 1
        entry[1] += pause
        if pause > entry[2]:
            entry[2] = pause


def install():
    """Start timing collections in this process (idempotent)."""
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def freeze():
    """Collect once, then move every live object into the permanent generation; return how many."""
    gc.collect()
    gc.freeze()
    # Counted once here: gc.get_freeze_count() walks the whole permanent
    # generation (CPython's gc_list_size), ~10 ms for a Django worker's
    # objects, too slow for every /healthz.
    _frozen[0] = gc.get_freeze_count()
    return _frozen[0]


def stats():
    """Return {"generation N": {"collections", "total_ms", "max_ms"}, "frozen": objects} since ``install``.

    frozen: the objects ``freeze`` moved to the permanent generation (0 before
    it ran). Costs no walk over any generation.
    """
    out = {
        f"generation {generation}": {
            "collections": count,
            "total_ms": round(total * 1000, 3),
            "max_ms": round(longest * 1000, 3),
        }
        for generation, (count, total, longest) in enumerate(_pauses)
    }
    out["frozen"] = _frozen[0]
    return out
