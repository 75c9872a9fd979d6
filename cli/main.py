"""The ``stepmesh`` command: ``scheduler``, ``launch`` and ``info``.

Heavy imports (UCX, torch) happen inside the commands, so ``--help`` stays quick.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from typing import Any

import click

from stepmesh._version import __version__

from .launch import LAUNCH_ROLES, RESERVED_ENV, Launcher, LaunchSpec

__all__ = ["main"]

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

_COUNT = click.IntRange(min=1)
_PORT = click.IntRange(min=0, max=65535)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="stepmesh", message="%(prog)s %(version)s")
def main() -> None:
    """StepMesh on UCX: Attention-FFN disaggregation communication.

    Configuration comes from StepMesh's environment variables (DMLC_ROLE,
    DMLC_NUM_WORKER, DMLC_NUM_SERVER, DMLC_GROUP_SIZE, DMLC_PS_ROOT_URI,
    DMLC_PS_ROOT_PORT, ...) and STEPMESH_* variables; options given on the
    command line win over them.
    """


# --------------------------------------------------------------------- scheduler
@main.command()
@click.option("--port", type=_PORT, default=None, help="Port to listen on; 0 picks a free one. [env: DMLC_PS_ROOT_PORT]")
@click.option("--host", default=None, help="Address nodes use to reach this scheduler. [env: DMLC_PS_ROOT_URI]")
@click.option("--workers", type=_COUNT, default=None, help="Workers per instance group. [env: DMLC_NUM_WORKER]")
@click.option("--servers", type=_COUNT, default=None, help="Servers per instance group. [env: DMLC_NUM_SERVER]")
@click.option("--group-size", type=_COUNT, default=None, help="Instance groups (processes per node). [env: DMLC_GROUP_SIZE]")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Once listening, write the port to this file (atomically).",
)
def scheduler(
    port: int | None,
    host: str | None,
    workers: int | None,
    servers: int | None,
    group_size: int | None,
    port_file: str | None,
) -> None:
    """Run the mesh's scheduler until every node has called stop().

    Prints "stepmesh scheduler listening on port PORT" once listening. Exits 0
    when the mesh shut down cleanly, 1 on a configuration or mesh error.
    """
    import stepmesh

    overrides: dict[str, Any] = {}
    for name, value in (
        ("root_port", port),
        ("root_uri", host),
        ("num_workers", workers),
        ("num_servers", servers),
        ("group_size", group_size),
    ):
        if value is not None:
            overrides[name] = value
    try:
        cfg = stepmesh.Config.from_env(role="scheduler", **overrides)
        _setup_logging(cfg.verbose)
        sched = stepmesh.Scheduler(cfg)
        bound = sched.start()
        if port_file is not None:
            _write_atomically(port_file, f"{bound}\n")
        click.echo(f"stepmesh scheduler listening on port {bound}")
        sys.stdout.flush()
        sched.stop()
    except stepmesh.StepMeshError as e:
        click.echo(f"stepmesh scheduler: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # the port file could not be written
        click.echo(f"stepmesh scheduler: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("stepmesh scheduler: interrupted", err=True)
        sys.exit(130)


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=_LOG_LEVELS.get(verbose, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------- info
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json: bool) -> None:
    """Show versions, the UCX transports and devices found, and the backend."""
    from .info import collect, format_json, format_text

    report = collect()
    click.echo(format_json(report) if as_json else format_text(report))


# ----------------------------------------------------------------------- launch
def _parse_env(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (KEY a valid variable name)", ctx, param)
        if key in RESERVED_ENV:
            raise click.BadParameter(f"{key} is set by launch itself; use {RESERVED_ENV[key]}", ctx, param)
        out[key] = value
    return out


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--role",
    type=click.Choice(LAUNCH_ROLES),
    default="joint",
    show_default=True,
    help="joint: scheduler, servers and workers here; server: scheduler and servers "
    "(prints the scheduler's HOST:PORT as the first line); worker: workers only, "
    "joining the scheduler at --scheduler-host/--port.",
)
@click.option("--workers", "-w", type=_COUNT, default=1, show_default=True, help="Workers per instance group (DMLC_NUM_WORKER).")
@click.option("--servers", "-s", type=_COUNT, default=1, show_default=True, help="Servers per instance group (DMLC_NUM_SERVER).")
@click.option(
    "--group-size", "-g", type=_COUNT, default=1, show_default=True,
    help="Instance groups (DMLC_GROUP_SIZE): processes per node, one per GPU; STEPMESH_GPU is the index.",
)  # fmt: skip
@click.option(
    "--scheduler-host",
    default=None,
    help="Scheduler address given to the nodes (DMLC_PS_ROOT_URI). Default 127.0.0.1; required for --role worker.",
)
@click.option(
    "--port",
    type=_PORT,
    default=None,
    help="Scheduler port (DMLC_PS_ROOT_PORT). Default: a free port; required for --role worker.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Bound on the whole run in seconds: then everything is killed and launch exits 124.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Seconds children get between SIGTERM and SIGKILL when launch stops them.",
)
@click.option(
    "--env", "-e", "env", multiple=True, callback=_parse_env, metavar="KEY=VALUE",
    help="Extra environment variable for every child (repeatable).",
)  # fmt: skip
@click.option("--verbose", "-v", is_flag=True, help="Report when each child starts (with its pid) and when it exits.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def launch(
    role: str,
    workers: int,
    servers: int,
    group_size: int,
    scheduler_host: str | None,
    port: int | None,
    timeout: float | None,
    grace: float,
    env: dict[str, str],
    verbose: bool,
    command: tuple[str, ...],
) -> None:
    """Start a local mesh running CMD in every server and worker.

    The equivalent of StepMesh's run_single_gpu.sh / run_multi_gpu.sh. Starts
    (per --role) a scheduler, SERVERS x GROUP_SIZE servers and WORKERS x
    GROUP_SIZE workers; each runs CMD with DMLC_ROLE, DMLC_NODE_RANK (rank in
    its role within its group), STEPMESH_GPU (its group), DMLC_NUM_WORKER,
    DMLC_NUM_SERVER, DMLC_GROUP_SIZE, DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT set.
    Each output line is prefixed with "[role rank] " ("[role rank.gG] " with
    several groups).

    SIGINT/SIGTERM are forwarded to every child. When a child fails, the
    others are stopped and launch exits non-zero naming it; it exits 0 only
    when every child exited 0.

    \b
    Examples:
      stepmesh launch --workers 2 --servers 2 -- python my_afd.py
      stepmesh launch --role server --servers 2 -- python ffn.py
      stepmesh launch --role worker --scheduler-host 10.0.0.5 --port 43121 -- python attn.py
    """
    if not command:
        raise click.UsageError("missing the command to run: stepmesh launch [OPTIONS] -- CMD [ARGS]...")
    if role == "worker":
        missing = [o for o, v in (("--scheduler-host", scheduler_host), ("--port", port)) if not v]
        if missing:
            raise click.UsageError(
                f"--role worker needs {' and '.join(missing)}: the scheduler's address "
                "(what `stepmesh launch --role server` printed)"
            )
    if os.sep not in command[0] and shutil.which(command[0]) is None:
        raise click.UsageError(f"command not found: {command[0]!r}")
    spec = LaunchSpec(
        command=tuple(command),
        role=role,
        num_workers=workers,
        num_servers=servers,
        group_size=group_size,
        scheduler_host=scheduler_host,
        port=port,
        timeout=timeout,
        grace=grace,
        env=env,
        verbose=verbose,
    )
    sys.exit(Launcher(spec).run())


from .bench import bench  # noqa: E402 - registered after the group is defined

main.add_command(bench)
