"""Diagnostics the memory benchmark reads from a worker (mounted only by bench.settings)."""

import gc
import os
import sys
import tracemalloc
from collections import Counter

from django.http import JsonResponse


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(request):
    """This worker's memory: RSS, live objects by type, greenlets, and tracemalloc by file when tracing.

    Runs a full collection first, so garbage does not count.
    """
    gc.collect()
    objects = gc.get_objects()
    by_type = Counter(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in objects)
    greenlet = sys.modules.get("greenlet")
    greenlets = sum(1 for obj in objects if greenlet is not None and isinstance(obj, greenlet.greenlet))
    body = {
        "pid": os.getpid(),
        "rss_bytes": _rss_bytes(),
        "gc_objects": len(objects),
        "by_type": dict(by_type.most_common(80)),
        "greenlets": greenlets,
        "frozen": gc.get_freeze_count(),
    }
    del objects
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        by_file = Counter()
        for stat in snapshot.statistics("filename"):
            name = stat.traceback[0].filename
            for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
                if marker in name:
                    name = name.split(marker, 1)[1]
                    break
            by_file[name] += stat.size
        body["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        body["traced_by_file"] = dict(by_file.most_common(80))
    return JsonResponse(body)
