"""Round by round, what a saved ``stepmesh bench --json`` run did: each contender's p50 and stepmesh's stages.

    python benchmarks/rounds.py RESULT.json ...

A slow spell shows as a round whose p50 is off the others'; the stages say where stepmesh spent it.
"""

from __future__ import annotations

import json
import statistics

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def main(results: tuple[str, ...]) -> None:
    """Print RESULTS' per-round medians."""
    for path in results:
        with open(path) as f:
            doc = json.load(f)
        rounds = doc["options"]["rounds"]
        by_round = doc.get("trace_breakdown_by_round_us", [])
        click.echo(f"{path}: {doc['workload']['name']}, {rounds} rounds")
        names = [n for n, c in doc["contenders"].items() if c["latencies_us"] and n != "perftest"]
        stages = list(by_round[0].get("server 0", {})) if by_round else []
        click.echo("round " + "".join(f"{n + ' p50':>16}" for n in names) + "".join(f"{s:>24}" for s in stages))
        for r in range(rounds):
            row = f"{r + 1:>5} "
            for n in names:
                lat = doc["contenders"][n]["latencies_us"]
                per = len(lat) // rounds
                row += f"{statistics.median(lat[r * per : (r + 1) * per]):>16.1f}" if per else f"{'-':>16}"
            if r < len(by_round):
                row += "".join(f"{by_round[r]['server 0'][s]:>24.1f}" for s in stages)
            click.echo(row)


if __name__ == "__main__":
    main()
