"""Run StepMesh's own scripts on stepmesh, changing nothing but their import line.

    python benchmarks/stepmesh_compat/run.py --stepmesh PATH/TO/StepMesh [--device cpu|cuda] [--out DIR]

Fetches nothing: it reads a checkout of stepfun-ai/StepMesh. Each script of
``tests/fserver/`` and ``tests/benchmark/bmk_comm_latency_multiserver.py`` runs as
StepMesh's ``run_single_gpu.sh`` runs it: a scheduler, a server and a worker,
each the same script with StepMesh's environment. Its ``import fserver_lib as X``
line becomes ``import stepmesh as X``; the benchmark's iteration count is cut
(it loops 10**8 times); on the CPU, CUDA device strings become ``cpu`` (scripts
that need a GPU, CUDA graphs, have no CPU form). ``tests/vllm/stepmesh_connector.py``
is driven by ``connector_driver.py`` through a stand-in for the vLLM classes it
imports (``standin/``), and every answer is checked.

A script passes when each of its processes exits 0 in time (and prints what the
script prints: the benchmark's breakdown lines, the connector driver's RESULT).
Exits non-zero if any failed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "tests/fserver/test_fserver.py",
    "tests/fserver/test_fserver_diff_stage.py",
    "tests/fserver/test_fserver_dynamic.py",
    "tests/fserver/test_kernel_wait.py",
    "tests/benchmark/bmk_comm_latency_multiserver.py",
]
CONNECTOR = "tests/vllm/stepmesh_connector.py"
GPU_ONLY = {"test_kernel_wait.py": "CUDA graphs and mapped pinned memory"}
BENCH_ITERS = 1500  # bmk_comm_latency_multiserver.py loops 10**8 times; it prints a breakdown every 500
_IMPORT = re.compile(r"^import fserver_lib as (\w+)\s*$", re.M)
# StepMesh's run_single_gpu.sh, as far as it concerns a single host
STEPMESH_ENV = {
    "DMLC_NUM_WORKER": "1", "DMLC_NUM_SERVER": "1", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_ENABLE_RDMA": "ibverbs",
    "DMLC_INTERFACE": "auto", "DMLC_NODE_HOST": "127.0.0.1", "STEPMESH_SPLIT_QP_LAG": "0", "STEPMESH_BIND_CPU_CORE": "1",
    "STEPMESH_GPU": "0", "PS_VERBOSE": "1", "UCX_WARN_UNUSED_ENV_VARS": "n",
}
# Runs a script as __main__ and then leaves at once: the benchmark's printing thread never ends by itself.
_WRAPPER = "import os, runpy, sys; sys.argv = [sys.argv[1]]; runpy.run_path(sys.argv[0], run_name='__main__'); " \
           "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"


def rewrite(source: str, name: str, device: str) -> str:
    """The script with only its import line changed (plus the benchmark's iteration cut and, on CPU, device strings)."""
    out, n = _IMPORT.subn(r"import stepmesh as \1", source)
    if n != 1:
        raise click.ClickException(f"{name}: expected one 'import fserver_lib as ...' line, found {n}")
    if name == "bmk_comm_latency_multiserver.py":
        out, n = re.subn(r"^num_iters = \d+", f"num_iters = {BENCH_ITERS}", out, flags=re.M)
        assert n == 1, "the benchmark's num_iters line moved"
    if device == "cpu":
        for pattern, repl in (
            (r"device=f'cuda:\{gpu\}'", "device='cpu'"),
            (r"device='cuda'", "device='cpu'"),
            (r"torch\.device\('cuda'\)", "torch.device('cpu')"),
            (r"torch\.set_default_device\('cuda:\{\}'\.format\(gpu\)\)", "torch.set_default_device('cpu')"),
            (r"torch\.cuda\.set_device\(", "(lambda *_: None)("),
        ):
            out = re.sub(pattern, repl, out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    detail: str
    output: str


def _run(name: str, procs: list[tuple[str, list[str], dict[str, str]]], cwd: Path, timeout: float) -> Outcome:
    """Start every (label, argv, env); pass when all exit 0 within ``timeout``. Kills what is left, by pid."""
    t0 = time.monotonic()
    running = []
    logs = {}
    for label, argv, env in procs:
        log = tempfile.TemporaryFile(mode="w+")
        logs[label] = log
        running.append((label, subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)))
        time.sleep(0.2)
    codes = {}
    try:
        for label, p in running:
            left = max(1.0, timeout - (time.monotonic() - t0))
            try:
                codes[label] = p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                codes[label] = None
    finally:
        for _, p in running:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    text = []
    for label, log in logs.items():
        log.seek(0)
        text.append(f"--- {label} (exit {codes.get(label)}) ---\n{log.read()}")
        log.close()
    ok = all(c == 0 for c in codes.values())
    detail = ", ".join(f"{k} {'timed out' if c is None else f'exit {c}'}" for k, c in codes.items())
    return Outcome(name, ok, time.monotonic() - t0, detail, "\n".join(text))


def run_script(path: Path, device: str, work: Path, timeout: float) -> Outcome:
    name = path.name
    script = work / name
    script.write_text(rewrite(path.read_text(), name, device))
    port = str(_free_port())
    env = dict(os.environ, **STEPMESH_ENV, DMLC_PS_ROOT_PORT=port)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "standin"), env.get("PYTHONPATH", "")])
    if device == "cuda":
        env["STEPMESH_BACKEND"] = "GPU"
    procs = [
        ("scheduler", [sys.executable, "-c", _WRAPPER, str(script)], dict(env, DMLC_ROLE="scheduler")),
        ("server", [sys.executable, "-c", _WRAPPER, str(script)], dict(env, DMLC_ROLE="server", STEPMESH_CPU_START_OFFSET="10")),
        ("worker", [sys.executable, "-c", _WRAPPER, str(script)], dict(env, DMLC_ROLE="worker", STEPMESH_CPU_START_OFFSET="15")),
    ]
    return _run(name, procs, work, timeout)


def run_connector(path: Path, device: str, work: Path, timeout: float, layers: int = 20) -> Outcome:
    (work / "stepmesh_connector.py").write_text(rewrite(path.read_text(), path.name, device))
    bindir = work / "bin"  # the connector starts `python -c ...` for its own scheduler: give it one to find
    bindir.mkdir(exist_ok=True)
    if not (bindir / "python").exists():
        (bindir / "python").symlink_to(sys.executable)
    port = str(_free_port())
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "standin"), str(work), env.get("PYTHONPATH", "")])
    sched_env = dict(env, DMLC_ROLE="scheduler", DMLC_PS_ROOT_PORT=port, DMLC_PS_ROOT_URI="127.0.0.1",
                     DMLC_NUM_WORKER="1", DMLC_NUM_SERVER="1")
    driver = str(HERE / "connector_driver.py")
    procs = [
        ("scheduler", [sys.executable, "-c", "import stepmesh as f; f.init(); f.stop()"], sched_env),
        ("ffn", [sys.executable, driver, "ffn", str(layers), "3", device, port], env),
        ("attention", [sys.executable, driver, "attention", str(layers), "3", device, port], env),
    ]
    return _run("stepmesh_connector.py", procs, work, timeout)


@click.command()
@click.option("--stepmesh", "root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A checkout of stepfun-ai/StepMesh.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each script's output here (one .log each).")
@click.option("--timeout", type=float, default=240.0, show_default=True, help="Seconds per script.")
def main(root: Path, device: str, out: Path | None, timeout: float) -> None:
    """Run StepMesh's scripts on stepmesh (only their import line changed) and say which pass."""
    missing = [s for s in [*SCRIPTS, CONNECTOR] if not (root / s).exists()]
    if missing:
        raise click.UsageError(f"--stepmesh {root}: not a StepMesh checkout (missing {', '.join(missing)})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="stepmesh-compat-") as tmp:
        work = Path(tmp)
        for rel in SCRIPTS:
            name = Path(rel).name
            if device == "cpu" and name in GPU_ONLY:
                click.echo(f"{name:<40} no CPU form ({GPU_ONLY[name]})")
                continue
            results.append(run_script(root / rel, device, work, timeout))
        results.append(run_connector(root / CONNECTOR, device, work, timeout))
    failed = 0
    for r in results:
        click.echo(f"{r.name:<40} {'PASS' if r.ok else 'FAIL'} in {r.seconds:5.1f} s ({r.detail})")
        lines = r.output.splitlines()
        for line in lines:
            if line.startswith(("RESULT", "comm bmk", "worker test done", "Fserver Stop", "Server stop", "Worker stop")):
                click.echo(f"    {line}")
        if "bmk" in r.name:
            breakdown = [ln for ln in lines if ln.startswith("\t")][:27]
            click.echo("\n".join(f"    {ln}" for ln in breakdown))
        if out is not None:
            (out / f"{r.name}.log").write_text(r.output)
        if not r.ok:
            failed += 1
            click.echo("\n".join(f"    | {ln}" for ln in lines[-25:]))
    click.echo(f"{len(results) - failed} of {len(results)} passed on {device}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
