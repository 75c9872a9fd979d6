"""Round-trip CDFs of several saved ``stepmesh bench --json`` results in one plot.

    python benchmarks/compare_cdf.py OUT.png "LABEL=RESULT.json:CONTENDER" ...

Each curve is one contender of one saved run (its last round's round trips);
the label gets its p50. For runs of the same call, so that they compare.
"""

from __future__ import annotations

import json
import statistics
import sys

import click


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.argument("curves", nargs=-1, required=True)
@click.option("--title", default="", help="The plot's title.")
def main(out: str, curves: tuple[str, ...], title: str) -> None:
    """Plot CURVES (``LABEL=RESULT.json:CONTENDER``) into OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for spec in curves:
        label, _, rest = spec.partition("=")
        path, _, contender = rest.rpartition(":")
        if not (label and path and contender):
            raise click.BadParameter(f"{spec!r} is not LABEL=RESULT.json:CONTENDER", param_hint="CURVES")
        with open(path) as f:
            lat = sorted(json.load(f)["contenders"][contender]["latencies_us"])
        ax.plot(
            lat, [(i + 1) / len(lat) for i in range(len(lat))], label=f"{label} (p50 {statistics.median(lat):.1f} us)"
        )
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us, log scale)")
    ax.set_ylabel("fraction of round trips")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
