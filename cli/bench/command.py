"""``stepmesh bench``: push_pull round trips next to the floors (C, raw ucxx, NCCL/gloo), interleaved in one run."""

from __future__ import annotations

import math
import sys
from typing import Any

import click

__all__ = ["bench"]

from .model import CONTENDERS as _CONTENDERS


def _parse_specs(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``64x7168:bfloat16,1:int32`` -> TensorSpec tuple."""
    if value is None:
        return None
    import torch

    from .model import TensorSpec

    specs = []
    for part in value.split(","):
        shape_s, _, dtype = part.strip().partition(":")
        dtype = dtype or "uint8"
        try:
            shape = tuple(int(x) for x in shape_s.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{part!r}: shape must be like 64x7168 (got {shape_s!r})") from None
        if not shape or any(d < 1 for d in shape):
            raise click.BadParameter(f"{part!r}: every dimension must be >= 1")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise click.BadParameter(f"{part!r}: {dtype!r} is not a torch dtype (bfloat16, float8_e4m3fn, int32, ...)")
        specs.append(TensorSpec(shape, dtype))
    return tuple(specs)


def _parse_contenders(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if n not in _CONTENDERS]
    if bad or "stepmesh" not in names:
        raise click.BadParameter(f"{value!r}: a comma list of {', '.join(_CONTENDERS)} that includes stepmesh")
    return names


@click.command()
@click.option("--preset", type=click.Choice(["small", "stepmesh-1x1", "step3", "2a2f"]), default="stepmesh-1x1",
              show_default=True,
              help="small: 8 KiB each way; stepmesh-1x1: 64x7168 bf16 + int32 count each way; step3: 128x7168 fp8 "
                   "push, 128x7168 bf16 pull; 2a2f: step3's tensors, 2 workers x 2 servers.")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=None, help="Workers (default: the preset's).")
@click.option("--servers", "-s", type=click.IntRange(min=1), default=None, help="Servers (default: the preset's).")
@click.option("--stages", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="push_pulls in flight per worker, kept full as a rolling window: the oldest is waited for and sent "
                   "again (StepMesh runs 3 micro-batch stages).")
@click.option("--push", callback=_parse_specs, default=None, metavar="SHAPE:DTYPE,...",
              help="Push tensors instead of the preset's, e.g. 64x7168:bfloat16,1:int32.")
@click.option("--pull", callback=_parse_specs, default=None, metavar="SHAPE:DTYPE,...",
              help="Pull tensors per server instead of the preset's.")
@click.option("--iters", type=click.IntRange(min=1), default=2000, show_default=True, help="Measured round trips per contender.")
@click.option("--warmup", type=click.IntRange(min=0), default=200, show_default=True, help="Unmeasured round trips first.")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Interleaved rounds (A B A B ...) the iterations are split into.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--progress", "progress_mode", type=click.Choice(["polling", "blocking", "thread"]), default="polling",
              show_default=True, help="UCX progress mode of every contender.")
@click.option("--pin/--no-pin", default=True, show_default=True, help="Pin each process to its own core.")
@click.option("--contenders", callback=_parse_contenders, default="stepmesh,protocol,ucxx,perftest,gloo,nccl,nixl",
              show_default=True,
              help="What to measure: perftest is UCX's C floor (ucx_perftest), protocol stepmesh's messages with none of "
                   "its bookkeeping, gloo/nccl torch.distributed; what cannot run here is named, not measured.")
@click.option("--traces/--no-traces", default=True, show_default=True,
              help="Collect fetch_trace stamps for the per-stage breakdown (read after each timed round).")
@click.option("--need-event/--no-need-event", default=True, show_default=True,
              help="push_pull's need_event: wait for the caller's CUDA stream before sending (device tensors).")
@click.option("--round-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds one round may take before the run fails, showing where each process is stuck.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every figure and sample here (schema stepmesh-bench/2, see docs/performance.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a latency CDF of every contender here (PNG; needs matplotlib).")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Measure nothing: print (and --plot) a result saved with --json, e.g. to draw "
                   "results from several machines in one place.")
def bench(
    preset: str,
    workers: int | None,
    servers: int | None,
    stages: int,
    push: Any,
    pull: Any,
    iters: int,
    warmup: int,
    rounds: int,
    device: str,
    progress_mode: str,
    pin: bool,
    contenders: tuple[str, ...],
    traces: bool,
    need_event: bool,
    round_timeout: float,
    json_path: str | None,
    plot_path: str | None,
    from_json: str | None,
) -> None:
    """Measure push_pull round trips on a real local mesh against the floors, in one run.

    Starts a scheduler, the servers and the workers (as `stepmesh launch` does),
    plus the floors moving the same bytes (UCX's own ucx_perftest, raw ucxx,
    stepmesh's bare messages, torch.distributed, NIXL where installed), and
    drives them in interleaved rounds so that machine drift hits all alike.
    Prints p50/p90/p99/max, ops/s and stepmesh's p50 over each contender's,
    then the per-server breakdown of the round trip. On one GPU, start the
    CUDA MPS daemon first (the line above the table says whether it was on).
    """
    from dataclasses import replace

    from . import engine, model, report

    if plot_path:
        try:
            report.check_plotting()  # before 20 s of measuring, not after
        except RuntimeError as e:
            raise click.UsageError(str(e)) from None
    if from_json:
        try:
            result = report.read_json(from_json)
        except (OSError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--from-json") from e
        _report(result, json_path, plot_path)
        return
    wl = model.PRESETS[preset]
    name = preset if push is None and pull is None and workers is None and servers is None else f"{preset}+custom"
    wl = replace(
        wl,
        name=name,
        push=push or wl.push,
        pull=pull or wl.pull,
        workers=workers or wl.workers,
        servers=servers or wl.servers,
    )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is visible to torch here")
    opts = model.BenchOptions(
        workload=wl, stages=stages, iters=iters, warmup=warmup, rounds=rounds, progress=progress_mode,
        device=device, pin=pin, contenders=contenders, traces=traces, round_timeout_s=round_timeout,
        need_event=need_event,
    )
    skipped = {c: engine.unavailable(c, opts) for c in contenders if c != "stepmesh"}
    for c, why in skipped.items():
        if why:
            click.echo(f"stepmesh bench: {c} not run: {why}", err=True)
    runnable = [c for c in contenders if not skipped.get(c)]
    total = rounds * len(runnable)
    env = model.Environment.here(device)
    click.echo(
        f"stepmesh bench: {wl.name}, {wl.workers} worker(s) x {wl.servers} server(s), {stages} stage(s), "
        f"{iters} iterations in {rounds} rounds, {progress_mode} progress, {device}"
        + (f" (MPS {'on' if env.mps else 'off'}, device lane {'on' if env.lane else 'off'})" if device == "cuda" else ""),
        err=True,
    )
    try:
        with click.progressbar(length=total, label="measuring", file=sys.stderr, show_eta=True) as bar:
            result = engine.run_bench(opts, on_round=bar.update)
    except Exception as e:  # a child's failure arrives with its output
        raise click.ClickException(f"benchmark failed: {e}") from e
    _report(result, json_path, plot_path)
    if math.isnan(result.contenders["stepmesh"].stats().get("p50_us", math.nan)):
        raise click.ClickException("stepmesh produced no samples")


def _report(result: Any, json_path: str | None, plot_path: str | None) -> None:
    """Print the table; write the JSON and the plot where asked."""
    from . import report

    click.echo(report.summarize(result))
    if json_path:
        report.write_json(result, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        try:
            report.plot(result, plot_path)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"wrote {plot_path}", err=True)
