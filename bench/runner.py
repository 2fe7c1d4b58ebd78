"""``python -m bench``: run the scenarios against each target and write the report.

Each target (``redis``, ``postgres``: the service with that broker backend;
``baseline``: one broker connection per stream) runs in a child process
(``bench.target``) with its own servers and Django settings; this process
gathers the results, merges them into ``results.json`` (a result replaces an
older one with the same target, scenario and N, so a long report can be built
from several bounded runs), and writes ``results.md`` and the plots.

Exit status: 0 when every scenario ran clean; 1 when events were lost or
duplicated, or streams failed to open or were dropped (outside connect-storm,
where errors are a measured figure, and the baseline's limit probe); 2 when a
target could not run at all. See bench/README.md.
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.servers import BASE

__all__ = ["main"]

SCENARIO_ORDER = ("send-event", "hold", "broadcast", "per-user", "connect-storm", "limit")
TARGETS = ("redis", "postgres", "baseline")

#: Stream counts (N) per scenario for a full run (``--streams`` replaces them).
FULL_SIZES = {
    "hold": [20000],
    "broadcast": [1000, 10000],
    "per-user": [10000],
    "connect-storm": [10000],
}
QUICK_SIZES = {"hold": [60], "broadcast": [60], "per-user": [60], "connect-storm": [60]}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIO_ORDER)} (default: all)"
    )
    parser.add_argument("--streams", type=int, nargs="+", metavar="N", help="stream counts for every scenario")
    parser.add_argument(
        "--events", type=int, metavar="M", help="broadcast events (default 200,000/N in 20-200); per-user: max(M, N)"
    )
    parser.add_argument("--rate", type=float, help="broadcast events/s (0: unpaced; default 10,000/N within 1-100)")
    parser.add_argument("--burst-events", type=int, help="unpaced events after the paced ones (default M; 0: none)")
    parser.add_argument("--user-rate", type=float, default=1000.0, help="per-user events per second (0: unpaced)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--baseline-streams", type=int, default=90, help="largest N the baseline runs (default 90)")
    parser.add_argument("--quick", action="store_true", help="small N and short phases: a smoke test (< 1 min)")
    parser.add_argument("--out", type=Path, help="output folder (default docs/benchmarks; bench/results with --quick)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in the output folder")
    parser.add_argument("--heartbeat", type=float, help="MYAPP_HEARTBEAT_SECONDS for the servers (default 15)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="hold: seconds of idle CPU measurement")
    parser.add_argument("--healthz-requests", type=int, default=300, help="hold: sequential GET /healthz requests")
    parser.add_argument("--healthz-seconds", type=float, default=16.0, help="hold: seconds the requests spread over")
    parser.add_argument("--concurrency", type=int, default=200, help="streams opening at once per load generator")
    parser.add_argument("--open-timeout", type=float, default=60.0, help="seconds a stream may take to go live")
    parser.add_argument("--storm-timeout", type=float, default=120.0, help="connect-storm: seconds per stream")
    parser.add_argument("--collect-timeout", type=float, default=60.0, help="seconds to wait for the last deliveries")
    parser.add_argument("--payload", type=int, default=100, help="bytes of event data (JSON)")
    parser.add_argument("--send-events", type=int, default=2000, help="send-event: publishes to time")
    parser.add_argument("--limit-max", type=int, default=400, help="baseline limit probe: most streams to try")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    parser.add_argument("--loadgen-processes", type=int, help="load generator processes (default: N / 5,000, 2-4)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' scratch folders (logs)")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="python",
        choices=("python", "native"),
        help="py-spy one worker during the paced delivery phase (native: include C frames)",
    )
    parser.add_argument("--verbose", action="store_true", help="log more progress detail")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIO_ORDER and name != "all"]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIO_ORDER)}")
    if args.quick:
        for name, value in (
            ("idle_seconds", 1.0),
            ("healthz_requests", 30),
            ("healthz_seconds", 0.5),
            ("events", args.events or 30),
            ("send_events", 200),
            ("heartbeat", args.heartbeat or 1.0),
            ("limit_max", 250),
            ("collect_timeout", 20.0),
        ):
            setattr(args, name, value)
    if args.out is None:
        args.out = BASE / ("bench/results" if args.quick else "docs/benchmarks")
    return args


def plan(args):
    """Return {target: (scenarios, {scenario: [N, ...]})} for the run."""
    everything = not args.scenarios or "all" in args.scenarios
    chosen = [name for name in SCENARIO_ORDER if everything or name in args.scenarios]
    defaults = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = {name: sorted(set(args.streams)) if args.streams else defaults[name] for name in defaults}
    plans = {}
    for target in args.targets:
        names = [name for name in chosen if name != "limit" or target == "baseline"]
        if target == "baseline":
            cap = args.baseline_streams
            target_sizes = {name: sorted({min(n, cap) for n in values}) for name, values in sizes.items()}
        else:
            target_sizes = sizes
        plans[target] = (names, target_sizes)
    return plans


def run_target(target, scenarios, sizes, args, scratch):
    """Run one target in a child process; return its outcome dict."""
    config_path = scratch / f"{target}-config.json"
    result_path = scratch / f"{target}-result.json"
    options = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    config_path.write_text(json.dumps({"target": target, "scenarios": scenarios, "sizes": sizes, "options": options}))
    process = subprocess.Popen([sys.executable, "-m", "bench.target", str(config_path), str(result_path)], cwd=BASE)
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()  # the child stops its servers
        process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result_path.exists():
        return json.loads(result_path.read_text())
    error = f"bench.target exited with {process.returncode}"
    return {"target": target, "results": [], "error": error, "server_log": {}}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    began = time.monotonic()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        for target, (scenarios, sizes) in plan(args).items():
            if scenarios:
                outcomes.append(run_target(target, scenarios, sizes, args, Path(scratch)))
    run = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "heartbeat_s": args.heartbeat or 15.0,
        "wall_s": round(time.monotonic() - began, 1),
    }
    paths = report.write(outcomes, run, args.out, fresh=args.fresh)
    problems = [
        f"{result['target']} {result['scenario']} N={result['streams']}: {problem}"
        for outcome in outcomes
        for result in outcome["results"]
        for problem in result["problems"]
    ]
    crashed = [f"{outcome['target']}: {outcome['error']}" for outcome in outcomes if outcome["error"]]
    print(f"\nwrote {', '.join(str(path) for path in paths)} in {run['wall_s']} s", file=sys.stderr)
    if crashed or problems:
        print("\nBENCHMARK FAILED:", file=sys.stderr)
        for line in crashed + problems:
            print(f"  - {line}", file=sys.stderr)
        return 2 if crashed else 1
    print("all scenarios clean: no lost or duplicate events", file=sys.stderr)
    return 0
