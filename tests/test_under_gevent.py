"""The hub, stream and sink tests again, in a process that gevent patched: the branches production runs.

Under gunicorn's gevent worker threads are greenlets, so ``Subscription.get``
parks without the lock, the waker keeps libev watchers, hang-ups are waited
on cooperatively, and the hub's threads are greenlets. The in-process suite
runs with real threads; this runs the same test files in a subprocess that
patched everything first (patching is process-wide, as psycopg's
``tests/test_gevent.py`` does it).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE = Path(__file__).resolve().parent.parent
FILES = ["tests/test_hub.py", "tests/test_stream.py", "tests/test_sink.py", "tests/test_control.py"]
FILES.append("tests/test_presence.py")
FILES.append("tests/test_counters.py")

_RUN = """
from gevent import monkey
monkey.patch_all()
import sys
import pytest
import myapp.subscription
assert myapp.subscription.GREENLETS, "threads are greenlets here"
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


@pytest.mark.skipif(os.environ.get("MYAPP_UNDER_GEVENT") == "1", reason="already under gevent")
def test_hub_stream_and_sink_tests_pass_under_gevent():
    """Every hub, stream, sink, control and presence test passes with gevent's patching, as in a gunicorn worker."""
    env = {**os.environ, "MYAPP_UNDER_GEVENT": "1", "PSYCOPG_WAIT_FUNC": "wait_poll"}
    result = subprocess.run(
        [sys.executable, "-c", _RUN, *FILES], cwd=BASE, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
