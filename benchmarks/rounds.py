"""Round by round, what a saved ``stepmesh bench --json`` run did: each contender's p50 and stepmesh's stages.

    python benchmarks/rounds.py RESULT.json ...

A slow spell shows as a round whose p50 is off the others'; the stages say where stepmesh spent it.
"""

from __future__ import annotations

import statistics

import click
from stepmesh.cli.bench.report import read_json


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def main(results: tuple[str, ...]) -> None:
    """Print RESULTS' per-round medians."""
    for path in results:
        result = read_json(path)
        rounds = result.options.rounds
        click.echo(f"{path}: {result.options.workload.name}, {rounds} rounds")
        names = [n for n, c in result.contenders.items() if c.latencies_us and n != "perftest"]
        stages = list(result.trace_rounds[0].get("server 0", {})) if result.trace_rounds else []
        click.echo("round " + "".join(f"{n + ' p50':>16}" for n in names) + "".join(f"{s:>24}" for s in stages))
        for r in range(rounds):
            row = f"{r + 1:>5} "
            for n in names:
                lat = result.contenders[n].latencies_us
                per = len(lat) // rounds
                row += f"{statistics.median(lat[r * per : (r + 1) * per]):>16.1f}" if per else f"{'-':>16}"
            if r < len(result.trace_rounds):
                row += "".join(f"{result.trace_rounds[r]['server 0'][s]:>24.1f}" for s in stages)
            click.echo(row)


if __name__ == "__main__":
    main()
