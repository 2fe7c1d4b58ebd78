"""Optional sampling profiles of the gunicorn workers during a delivery phase (``--profile``).

Runs ``py-spy record --format raw`` (collapsed stacks, on-CPU samples only)
against one worker for the phase and summarises it: the functions where the
samples were (self) and the functions on the stack (inclusive), in percent of
the samples. The raw file stays next to the report for flame graph tools.
"""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler"]

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


class Profiler:
    """py-spy on one process for ``seconds``; ``finish()`` returns the summary dict.

    pid: the process to sample. output: the raw file (Path). seconds: how
    long to sample (float). rate: samples per second.
    """

    def __init__(self, pid, output, seconds, rate=500, native=False):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).parent / "py-spy"
        command = [str(py_spy), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
        command += ["--rate", str(rate), "--format", "raw", "--nolineno", "--output", str(self.output)]
        if native:
            command.append("--native")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self, top=12):
        """Wait for py-spy; return {"file", "samples", "self_pct": {...}, "inclusive_pct": {...}}."""
        try:
            _, error = self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, error = self.process.communicate()
        if not self.output.exists():
            return {"error": (error or b"").decode(errors="replace")[-500:]}
        own, inclusive, total = Counter(), Counter(), 0
        for line in self.output.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            total += samples
            frames = [_name(frame) for frame in stack.split(";")]
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples

        def share(counter):
            return {name: round(100 * n / total, 1) for name, n in counter.most_common(top)} if total else {}

        return {"file": self.output.name, "samples": total, "self_pct": share(own), "inclusive_pct": share(inclusive)}


def _name(frame):
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['function']} ({match['file']})"
