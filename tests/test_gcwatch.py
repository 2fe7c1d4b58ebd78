"""myapp.gcwatch: garbage-collection pauses and the frozen generation, as /healthz reports them."""

import json
import subprocess
import sys

SCRIPT = """
import gc, json
from myapp import gcwatch

gcwatch.install()
frozen = gcwatch.freeze()
calls = []
real = gc.get_freeze_count
gc.get_freeze_count = lambda: calls.append(1) or real()  # walks the permanent generation: O(objects)
first = gcwatch.stats()
gc.collect()
after = gcwatch.stats()
print(json.dumps({"frozen": frozen, "first": first, "after": after, "walks": len(calls)}))
"""


def test_stats_report_the_frozen_objects_and_collections_without_walking_the_permanent_generation():
    """stats() is cheap enough for every /healthz: it reports freeze()'s count instead of recounting it."""
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(completed.stdout)
    assert result["frozen"] > 1000  # the interpreter and myapp's imports
    assert result["first"]["frozen"] == result["after"]["frozen"] == result["frozen"]
    assert result["walks"] == 0
    full = result["after"]["generation 2"]
    assert full["collections"] == result["first"]["generation 2"]["collections"] + 1
    assert full["max_ms"] >= 0 and full["total_ms"] >= full["max_ms"]
