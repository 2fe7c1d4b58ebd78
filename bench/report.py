"""Write the benchmark's results: raw JSON, a markdown report and PNG plots.

``write(outcomes, run, folder)`` merges the new results into
``<folder>/results.json`` (one entry per target, scenario and N; newer
replaces older unless ``fresh``), then renders ``results.md`` (the targets
table, one table per scenario, ours ÷ baseline at equal N, problems and
server log findings) and ``summary.png`` / ``latency_cdf.png`` (matplotlib).
"""

import json
import os
import platform
import time

__all__ = ["write", "TARGETS"]

NAMES = {"redis": "Redis (ours)", "postgres": "PostgreSQL (ours)", "baseline": "Baseline (PubSub per stream)"}
ORDER = ("redis", "postgres", "baseline")

#: The goals (2 cores, 2 gevent workers, Redis backend, load generator on the
#: same machine): label, scenario, figure (key path), comparison, threshold,
#: unit, the N the goal is stated for (None: any).
TARGETS = (
    ("/healthz p99 with N streams idle", "hold", ("healthz_ms", "p99"), "<", 10.0, "ms", 20000),
    ("worker memory per idle stream (RSS)", "hold", ("rss_per_stream_kb",), "<=", 12.0, "KB", 20000),
    ("longest garbage-collection pause, streams opening and closing", "hold", ("gc_max_pause_ms",), "<=", 50.0,
     "ms", 20000),
    ("worker CPU per delivered event, broadcast", "broadcast", ("worker_cpu_us_per_delivery",), "<=", 10.0, "µs",
     10000),
    ("one event to 10,000 subscribers, fully delivered p99", "broadcast", ("fanout_complete_ms", "p99"), "<=", 150.0,
     "ms", 10000),
    ("worker CPU per delivered event, per-user (1,000 events/s)", "per-user", ("worker_cpu_us_per_delivery",), "<=",
     30.0, "µs", 10000),
    ("worker CPU per delivered event, per-user burst", "per-user", ("burst_worker_cpu_us_per_delivery",), "<=", 15.0,
     "µs", 10000),
    ("per-user publish-to-receive p50", "per-user", ("latency_ms", "p50"), "<=", 0.3, "ms", 10000),
    ("per-user publish-to-receive p99", "per-user", ("latency_ms", "p99"), "<=", 1.5, "ms", 10000),
    ("10,000-client connect storm, all live", "connect-storm", ("all_live_s",), "<=", 3.0, "s", 10000),
    ("send_event median, local server", "send-event", ("send_event_ms", "p50"), "<=", 0.12, "ms", None),
)  # fmt: skip


def write(outcomes, run, folder, *, fresh=False):
    """Merge ``outcomes`` (from ``bench.target``) into ``folder`` and render it; return the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    data = {"runs": [], "results": [], "server_logs": {}}
    if path.exists() and not fresh:
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
    run = {
        **run,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
    }
    data["runs"].append(run)
    run_index = len(data["runs"]) - 1
    fresh_keys = set()
    for outcome in outcomes:
        for result in outcome["results"]:
            result["run"] = run_index
            fresh_keys.add(_key(result))
        data["server_logs"][outcome["target"]] = {**(outcome.get("server_log") or {}), "run": run_index}
        if outcome.get("error"):
            data["server_logs"][outcome["target"]]["target_error"] = outcome["error"]
    data["results"] = [result for result in data["results"] if _key(result) not in fresh_keys]
    data["results"] += [result for outcome in outcomes for result in outcome["results"]]
    data["results"].sort(key=lambda r: (_order(r["target"]), r["scenario"], r["streams"]))
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    written = [path]
    written += _plots(data["results"], folder)
    markdown = folder / "results.md"
    markdown.write_text(render(data, [p.name for p in written if p.suffix == ".png"]))
    written.insert(1, markdown)
    return written


def _key(result):
    return (result["target"], result["scenario"], result["streams"])


def _order(target):
    return ORDER.index(target) if target in ORDER else len(ORDER)


def _commit():
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _get(result, path):
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return " / ".join(_fmt(v) for v in value)
    return str(value)


def _pick(results, target, scenario, want_n=None):
    """The result of ``scenario`` for ``target``: at N == want_n if present, else the largest N."""
    found = [r for r in results if r["target"] == target and r["scenario"] == scenario and "crashed" not in str(r)]
    if not found:
        return None
    if want_n is not None:
        exact = [r for r in found if r["streams"] == want_n]
        if exact:
            return exact[0]
    return max(found, key=lambda r: r["streams"])


def _compare(value, op, threshold):
    if value is None:
        return None
    return value < threshold if op == "<" else value <= threshold


def _cell(result, path, unit):
    if result is None:
        return "not run", None
    value = _get(result, path)
    n = f" (N={result['streams']:,})" if result["streams"] else ""
    return f"{_fmt(value)} {unit}{n}", value


def _targets_table(results):
    lines = [
        "| Target | Redis (ours) | Status | PostgreSQL (ours) | Baseline | Redis ÷ baseline at the baseline's N |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    hold = _pick(results, "redis", "hold")
    limit = _pick(results, "baseline", "limit")
    held_status = "not run"
    if hold is not None:
        clean = not hold["problems"]
        if hold["streams"] >= 20000:
            held_status = "**pass**" if clean else "**miss**"
        else:
            held_status = ("pass" if clean else "miss") + f" at N={hold['streams']:,} (target N not run)"
    pg_hold = _pick(results, "postgres", "hold")

    def held(result):
        if result is None:
            return "not run"
        return f"{_fmt(result.get('streams_live'))} of {result['streams']:,} live, {len(result['problems'])} problems"

    baseline_held = "not run"
    if limit is not None:
        baseline_held = (
            f"first error at stream ~{limit['first_error_at']:,} ({_fmt(limit['errors'])})"
            if limit.get("first_error_at")
            else f"no error up to {limit['streams']:,}"
        )
    lines.append(
        f"| 20,000 concurrent streams held, no errors | {held(hold)} | {held_status} | {held(pg_hold)} "
        f"| {baseline_held} | – |"
    )
    for label, scenario, path, op, threshold, unit, want_n in TARGETS:
        ours = _pick(results, "redis", scenario, want_n)
        text, value = _cell(ours, path, unit)
        passed = _compare(value, op, threshold)
        status = "not run" if ours is None else ("**pass**" if passed else "**miss**")
        if ours is not None and want_n is not None and ours["streams"] < want_n:
            status = ("pass" if passed else "miss") + f" at N={ours['streams']:,} (target N not run)"
        pg_text, _ = _cell(_pick(results, "postgres", scenario, want_n), path, unit)
        base = _pick(results, "baseline", scenario, want_n)
        base_text, base_value = _cell(base, path, unit)
        ratio = "–"
        same = _pick(results, "redis", scenario, base["streams"]) if base is not None else None
        if same is not None and same["streams"] == base["streams"]:
            same_value = _get(same, path)
            if same_value is not None and base_value:
                ratio = f"{same_value / base_value:.2f}" + (f" (N={base['streams']:,})" if base["streams"] else "")
        lines.append(f"| {label} {op} {threshold:g} {unit} | {text} | {status} | {pg_text} | {base_text} | {ratio} |")
    return lines


#: Per scenario: (column header, key path) for the detail tables.
COLUMNS = {
    "hold": (
        ("live", ("streams_live",)),
        ("open s", ("open_s",)),
        ("RSS KB/stream", ("rss_per_stream_kb",)),
        ("streams per worker", ("streams_per_worker",)),
        ("idle CPU s/s", ("idle_cpu_s_per_s",)),
        ("heartbeat s", ("heartbeat_s",)),
        ("heartbeats/stream", ("heartbeats_per_stream",)),
        ("healthz p50 ms", ("healthz_ms", "p50")),
        ("healthz p99 ms", ("healthz_ms", "p99")),
        ("healthz max ms", ("healthz_ms", "max")),
        ("GC max pause ms", ("gc_max_pause_ms",)),
    ),
    "broadcast": (
        ("M events", ("events",)),
        ("events/s", ("rate_per_s",)),
        ("latency p50 ms", ("latency_ms", "p50")),
        ("latency p99 ms", ("latency_ms", "p99")),
        ("latency max ms", ("latency_ms", "max")),
        ("all N got it p50 ms", ("fanout_complete_ms", "p50")),
        ("all N got it p99 ms", ("fanout_complete_ms", "p99")),
        ("worker CPU µs/delivery", ("worker_cpu_us_per_delivery",)),
        ("broker CPU µs/delivery", ("broker_cpu_us_per_delivery",)),
        ("loadgen CPU µs/delivery", ("loadgen_cpu_us_per_delivery",)),
        ("burst events", ("burst_events",)),
        ("burst deliveries/s", ("deliveries_per_s",)),
        ("burst latency p99 ms", ("burst_latency_ms", "p99")),
        ("burst worker CPU µs/delivery", ("burst_worker_cpu_us_per_delivery",)),
        ("lost", ("lost",)),
        ("dups", ("dups",)),
    ),
    "connect-storm": (
        ("live", ("streams_live",)),
        ("all live s", ("all_live_s",)),
        ("errors", ("errors",)),
        ("error kinds", ("open_errors",)),
        ("connect→live p50 ms", ("connect_to_live_ms", "p50")),
        ("connect→live p99 ms", ("connect_to_live_ms", "p99")),
        ("worker CPU µs/connection", ("worker_cpu_us_per_connection",)),
    ),
    "send-event": (
        ("publishes", ("count",)),
        ("p50 ms", ("send_event_ms", "p50")),
        ("p99 ms", ("send_event_ms", "p99")),
        ("max ms", ("send_event_ms", "max")),
    ),
    "limit": (
        ("first error at stream", ("first_error_at",)),
        ("errors", ("errors",)),
        ("server log", ("server_log", "kinds")),
    ),
}
COLUMNS["per-user"] = COLUMNS["broadcast"]

#: Figures compared at equal N (ours ÷ baseline), lower is better except throughput.
RATIOS = {
    "hold": (("RSS KB/stream", ("rss_per_stream_kb",)), ("idle CPU s/s", ("idle_cpu_s_per_s",)),
             ("healthz p99 ms", ("healthz_ms", "p99"))),
    "broadcast": (("latency p99 ms", ("latency_ms", "p99")), ("all N got it p99 ms", ("fanout_complete_ms", "p99")),
                  ("worker CPU µs/delivery", ("worker_cpu_us_per_delivery",)),
                  ("broker CPU µs/delivery", ("broker_cpu_us_per_delivery",))),
    "connect-storm": (("all live s", ("all_live_s",)), ("worker CPU µs/connection", ("worker_cpu_us_per_connection",))),
    "send-event": (("p50 ms", ("send_event_ms", "p50")),),
}  # fmt: skip
RATIOS["per-user"] = RATIOS["broadcast"]

SCENARIO_TEXT = {
    "hold": "N idle streams on one channel. RSS per stream = (workers' RSS after opening N − before) ÷ N. "
    "Idle CPU = workers' CPU seconds per second over the idle window, heartbeats included. "
    "/healthz: sequential requests on new connections, spread over the window.",
    "broadcast": "N streams on one channel; M events published from the benchmark process at the given rate "
    "(paced), then the burst events as fast as one publisher can. Latency = publish call start to receipt by a "
    "client (every delivery). 'All N got it' = publish to the last of the N receipts, per event. CPU per delivery "
    "= CPU seconds during the paced phase ÷ deliveries (heartbeats included), for the workers, the broker server "
    "and the load generator. Burst deliveries/s = burst deliveries ÷ (last receipt − first burst publish).",
    "per-user": "N streams on N private channels; M events, event i to channel i mod N. Figures as in broadcast; "
    "the burst is limited by the single publishing process.",
    "connect-storm": "N clients start connecting at the same instant; 'all live s' = until the last stream.open "
    "arrived (empty when some failed).",
    "send-event": "Sequential publishes from the benchmark process (ours: myapp.publish.send_event; "
    "baseline: json.dumps + PUBLISH), no streams open.",
    "limit": "Baseline only: streams opened 25 at a time until the first failure.",
}


def _scenario_tables(results):
    lines = []
    for scenario in ("send-event", "hold", "broadcast", "per-user", "connect-storm", "limit"):
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        columns = COLUMNS[scenario]
        lines += ["", f"### {scenario}", "", SCENARIO_TEXT[scenario], ""]
        lines.append("| target | N | " + " | ".join(header for header, _ in columns) + " |")
        lines.append("| --- | --- |" + " --- |" * len(columns))
        for r in rows:
            cells = [_fmt(_get(r, path)) for _, path in columns]
            lines.append(f"| {NAMES.get(r['target'], r['target'])} | {r['streams']:,} | " + " | ".join(cells) + " |")
        ratio_rows = _ratio_rows(results, scenario)
        if ratio_rows:
            lines += ["", "Ours ÷ baseline at the same N (below 1 is better; deliveries/s not compared):", ""]
            lines += ratio_rows
    return lines


def _ratio_rows(results, scenario):
    figures = RATIOS.get(scenario)
    if not figures:
        return []
    lines = []
    base = {r["streams"]: r for r in results if r["target"] == "baseline" and r["scenario"] == scenario}
    for target in ("redis", "postgres"):
        for r in results:
            if r["target"] != target or r["scenario"] != scenario or r["streams"] not in base:
                continue
            other = base[r["streams"]]
            cells = []
            for header, path in figures:
                ours, theirs = _get(r, path), _get(other, path)
                ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "–"
                cells.append(f"{header}: {ratio}")
            lines.append(f"- {NAMES[target]} N={r['streams']:,}: " + "; ".join(cells))
    return lines


def render(data, images):
    """Return the markdown report (str) for the merged results."""
    results = data["results"]
    last = data["runs"][-1] if data["runs"] else {}
    machine = last.get("machine", {})
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `bench/` (see bench/README.md) at commit {last.get('commit')}, {last.get('finished')}; "
        f"{machine.get('cpus')} CPUs, Python {machine.get('python')}, {machine.get('system')}. "
        "Service: gunicorn with 2 gevent workers (or `--workers`, see the runs at the end); "
        "load generator processes on the same machine. "
        "Every figure's N (streams) is given; the baseline runs only at sizes it survives.",
        "",
        "## Targets",
        "",
        *_targets_table(results),
        "",
        "Status compares the Redis backend's figure with the goal. 'target N not run' means the figure was measured "
        "at a smaller N than the goal names. The last column divides ours by the baseline at the same N (the "
        "largest the baseline survives); below 1 means ours is better.",
        "",
        "## Scenarios",
        *_scenario_tables(results),
        "",
        "## Problems",
        "",
    ]
    problems = [
        f"- {NAMES.get(r['target'], r['target'])} {r['scenario']} N={r['streams']:,}: {problem}"
        for r in results
        for problem in r["problems"]
    ]
    lines += problems or ["None: no lost, duplicate or misrouted events, no failed or dropped streams."]
    lines += ["", "## Server logs (warnings and errors in gunicorn's output)", ""]
    for target, log in sorted(data.get("server_logs", {}).items(), key=lambda item: _order(item[0])):
        lines.append(f"- {NAMES.get(target, target)}: {log.get('count', 0)} lines; {_fmt(log.get('kinds') or {})}")
        if log.get("target_error"):
            lines.append(f"  - the target failed: {log['target_error']}")
        for line in log.get("first", [])[:3]:
            lines.append(f"  - `{line[:200]}`")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", "## Runs merged into this report", ""]
    lines += [f"- `{r.get('command')}` ({r.get('finished')}, {r.get('wall_s')} s)" for r in data["runs"][-12:]]
    return "\n".join(lines) + "\n"


def _plots(results, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"redis": "tab:red", "postgres": "tab:blue", "baseline": "tab:gray"}
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))

    def bars(axis, scenario, path, title, ylabel):
        labels, values, tints = [], [], []
        for target in ORDER:
            for r in sorted((r for r in results if r["target"] == target and r["scenario"] == scenario),
                            key=lambda r: r["streams"]):  # fmt: skip
                value = _get(r, path)
                if value is not None:
                    labels.append(f"{target}\nN={r['streams']:,}")
                    values.append(value)
                    tints.append(colors[target])
        axis.bar(range(len(values)), values, color=tints)
        axis.set_xticks(range(len(values)), labels, fontsize=7)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel)

    bars(axes[0][0], "hold", ("rss_per_stream_kb",), "Worker memory per idle stream", "KB (RSS)")
    bars(axes[0][1], "broadcast", ("worker_cpu_us_per_delivery",), "Worker CPU per delivery (broadcast)", "µs")
    bars(axes[1][0], "per-user", ("worker_cpu_us_per_delivery",), "Worker CPU per delivery (per-user)", "µs")
    axis = axes[1][1]
    for target in ORDER:
        rows = sorted(
            (r for r in results if r["target"] == target and r["scenario"] == "broadcast"), key=lambda r: r["streams"]
        )
        points = [(r["streams"], _get(r, ("fanout_complete_ms", "p99"))) for r in rows]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", color=colors[target], label=NAMES[target])
    axis.axhline(250, linestyle=":", color="black", linewidth=0.8, label="goal at N=10,000 (250 ms)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("subscribers N")
    axis.set_ylabel("ms")
    axis.set_title("Publish until all N received, p99 (broadcast)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = folder / "summary.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    figure, axis = plt.subplots(figsize=(8, 5))
    plotted = False
    for r in results:
        quantiles = r.get("latency_quantiles_ms")
        if r["scenario"] == "broadcast" and quantiles:
            levels = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
            style = "-" if r["target"] != "baseline" else "--"
            axis.plot(quantiles, levels, style, color=colors.get(r["target"]), alpha=0.5 + 0.5 * (r["streams"] >= 1000),
                      label=f"{r['target']} N={r['streams']:,}")  # fmt: skip
            plotted = True
    if plotted:
        axis.set_xscale("log")
        axis.set_xlabel("publish → receive latency (ms)")
        axis.set_ylabel("fraction of deliveries")
        axis.set_title("Broadcast delivery latency (CDF)")
        axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
        path = folder / "latency_cdf.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        written.append(path)
    plt.close(figure)
    return written
