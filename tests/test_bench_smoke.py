"""A small run of the benchmark, so it cannot rot (numbers are not asserted; see bench/README.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BASE = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_quick_benchmark_runs_clean(tmp_path):
    """python -m bench --quick runs every scenario on every target and reports nothing lost or duplicated."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    ran = {(result["target"], result["scenario"]) for result in results}
    for target in ("redis", "postgres", "baseline"):
        for scenario in ("send-event", "hold", "broadcast", "per-user", "connect-storm"):
            assert (target, scenario) in ran
    for result in results:
        assert result["problems"] == [], result
        if "lost" in result:
            assert (result["lost"], result["dups"]) == (0, 0)
    for name in ("results.md", "summary.png", "latency_cdf.png"):
        assert (tmp_path / name).stat().st_size > 0
