"""A run's table, its JSON, and its latency CDF."""

from __future__ import annotations

import json
import statistics

from .engine import STAGES
from .model import BenchResult

__all__ = ["summarize", "write_json", "read_json", "plot", "check_plotting"]


def summarize(result: BenchResult) -> str:
    """A plain-text table of every contender (and the per-stage breakdown of stepmesh's round trip)."""
    base = result.contenders.get("stepmesh")
    bstats = base.stats() if base else {}
    wl = result.options.workload
    opts = result.options
    lines = [
        f"workload {wl.name}: {wl.workers} worker(s) x {wl.servers} server(s), push {wl.push_bytes} B, "
        f"pull {wl.pull_bytes} B per server, {opts.stages} stage(s) in flight, "
        f"progress {opts.progress}, device {opts.device}" + ("" if opts.need_event else ", need_event=False"),
        "measured on " + (result.environment.describe() if result.environment.host else "(not recorded)"),
        "UCX options (stepmesh's data workers and the floors): "
        + (", ".join(f"{k}={v}" for k, v in result.ucx_options.items()) or "not recorded"),
        f"{'contender':<10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'max us':>9} {'ops/s':>9} "
        f"{'stepmesh p50 / its p50':>23}",
    ]
    for name, c in result.contenders.items():
        st = c.stats()
        if not st:
            lines.append(f"{name:<10} {c.note or 'no data'}")
            continue
        ratio = f"{bstats['p50_us'] / st['p50_us']:.2f}x" if bstats and name != "stepmesh" else "-"
        lines.append(
            f"{name:<10} {st['p50_us']:9.1f} {st['p90_us']:9.1f} {st['p99_us']:9.1f} {st['max_us']:9.1f} "
            f"{st['ops_per_s']:9.0f} {ratio:>23}"
        )
        if name == "perftest":
            lines.append(f"{'':<10} (ucx_perftest: one sample per round, each the median of its ping-pongs)")
    if result.traces:
        lines.append("stepmesh round trip by stage (median us):")
        names = [n for n, _, _ in STAGES]
        lines.append(f"{'':<10}" + "".join(f"{n:>24}" for n in names))
        for server, stages in result.traces.items():
            lines.append(f"{server:<10}" + "".join(f"{stages[n]:24.1f}" for n in names))
    return "\n".join(lines)


def write_json(result: BenchResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result.to_json(), fh, indent=1)


def read_json(path: str) -> BenchResult:
    """A result saved with ``--json`` (to print or plot it on another machine).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a stepmesh bench result.
    """
    with open(path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from e
    return BenchResult.from_json(doc)


def check_plotting() -> None:
    """Raise before anything is measured when a plot was asked for and cannot be drawn.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'stepmesh[bench]' (or matplotlib)") from e


def plot(result: BenchResult, path: str) -> None:
    """Latency CDF of every contender (needs matplotlib).

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, c in result.contenders.items():
        lat = sorted(c.latencies_us)
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        style = {"marker": "o", "linestyle": "--"} if name == "perftest" else {}
        ax.plot(lat, ys, label=f"{name} (p50 {statistics.median(lat):.1f} us)", **style)
    wl = result.options.workload
    opts = result.options
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us, log scale)")
    ax.set_ylabel("fraction of round trips")
    env = result.environment
    where = f"{env.device}{', MPS' if env.mps else ''}{', lane' if env.lane else ''}" if env.devices else "CPU"
    ax.set_title(
        f"{wl.name}: {wl.workers}x{wl.servers}, {opts.stages} stage(s), {opts.progress}, {where}"
        + ("" if opts.need_event else ", need_event=False"),
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
