"""Spawn a whole mesh in child processes, join them with one deadline, re-raise failures.

Every multi-process test of stepmesh goes through :func:`run_mesh`. Each child
runs ``target(ctx)`` (a module-level function) with its role's environment set;
its output goes to a file that is attached to the error when anything fails.
The scheduler runs in a child too, on a port it picks itself (port 0) and
reports back, so tests never guess ports. Children still running at the
deadline, or after one of them failed, are killed by pid.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NodeContext", "MeshError", "Mesh", "run_mesh", "spawn_mesh", "cli_command", "start_command", "run_command",
    "run_commands", "kill_session", "session_pids", "pid_alive", "wait_gone", "free_port",
]

_OUTPUT_TAIL = 6000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a listener another process opens later (a scheduler, a C floor).

    Taken from below the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``) where it can
    be: outgoing connections draw their source ports from that range, so a port probed there can be taken by
    any connection before the listener binds it (a CI run saw the scheduler fail with "Device is busy");
    below it only an explicit bind can take it.
    """
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = random.SystemRandom().sample(range(max(1024, low - 16384), low), 64) if low > 2048 else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free TCP port on {host}")


@dataclass(frozen=True)
class NodeContext:
    """What a child knows about itself."""

    role: str
    rank: int
    group: int
    env: dict[str, str]
    args: Any = None


class MeshError(AssertionError):
    """A child failed or the mesh ran out of time; carries every child's output."""


@dataclass
class _Child:
    name: str
    process: Any
    output: str
    result: Any = None
    error: str | None = None
    done: bool = False

    def tail(self) -> str:
        try:
            with open(self.output, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text[-_OUTPUT_TAIL:]


def _child_main(
    target: Callable[[NodeContext], Any] | None,
    ctx: NodeContext,
    output: str,
    queue: Any,
) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # Mesh.dump_stacks()
    for key, value in ctx.env.items():  # None: unset it in that child
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    name = "scheduler" if target is None else f"{ctx.role}-{ctx.group}-{ctx.rank}"
    try:
        if target is None:  # the scheduler
            from .config import Config
            from .control.scheduler import Scheduler

            sched = Scheduler(Config.from_env())
            queue.put(("port", name, sched.start()))
            sched.stop()
            result = None
        else:
            result = target(ctx)
        queue.put(("ok", name, result))
    except BaseException:
        queue.put(("error", name, traceback.format_exc()))
        raise SystemExit(1) from None


@dataclass
class Mesh:
    """Children of one mesh; use :meth:`join` (or :func:`run_mesh`)."""

    children: dict[str, _Child] = field(default_factory=dict)
    queue: Any = None
    deadline: float = 0.0
    port: int = 0
    tmpdir: Any = None
    spawn: Any = None
    base_env: dict[str, str] = field(default_factory=dict)
    args: Any = None

    def _start(self, name: str, target: Any, ctx: NodeContext) -> None:
        out = os.path.join(self.tmpdir.name, name + ".log")
        p = self.spawn.Process(target=_child_main, args=(target, ctx, out, self.queue), name=name, daemon=True)
        self.children[name] = _Child(name, p, out)
        p.start()

    def add_node(
        self, target: Callable[[NodeContext], Any], role: str, rank: int, group: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start one more node against this mesh's scheduler (one left out with ``skip``, say, started late)."""
        e = dict(self.base_env)
        e.update(DMLC_ROLE=role, DMLC_NODE_RANK=str(rank), STEPMESH_GPU=str(group), DMLC_PS_ROOT_PORT=str(self.port))
        e.update(env or {})
        self._start(f"{role}-{group}-{rank}", target, NodeContext(role, rank, group, e, self.args))

    def pids(self) -> dict[str, int]:
        return {n: c.process.pid for n, c in self.children.items()}

    def _drain(self, block_s: float) -> None:
        import queue as _q

        while True:
            try:
                kind, name, payload = self.queue.get(timeout=block_s)
            except _q.Empty:
                return
            block_s = 0.001
            child = self.children.get(name)
            if kind == "port":
                self.port = payload
            elif child is not None:
                if kind == "ok":
                    child.result, child.done = payload, True
                else:
                    child.error = payload

    def _report(self, headline: str) -> str:
        parts = [headline]
        for name, c in self.children.items():
            state = "ok" if c.done else ("failed" if c.error else f"exit {c.process.exitcode}")
            parts.append(f"--- {name} (pid {c.process.pid}, {state}) ---")
            if c.error:
                parts.append(c.error.rstrip())
            tail = c.tail().rstrip()
            if tail:
                parts.append("output:\n" + tail)
        return "\n".join(parts)

    def check(self) -> None:
        """Raise if any child failed or exited without reporting (does not wait).

        Raises:
            MeshError: with every child's error and output.
        """
        failed = self._collect(0.0)
        if failed:
            raise MeshError(self._report(f"{failed[0].name} failed"))

    def _collect(self, block_s: float) -> list[_Child]:
        """Take in the children's reports; a child that exited silently counts as failed."""
        self._drain(block_s)
        for c in self.children.values():
            if not c.process.is_alive() and not c.done and c.error is None:
                self._drain(0.2)  # its last words may still be in the queue
                if not c.done and c.error is None:
                    c.error = f"exited with code {c.process.exitcode} without reporting"
        return [c for c in self.children.values() if c.error]

    def dump_stacks(self, settle_s: float = 1.0) -> str:
        """Every live child's Python stacks (written to its output), as a report."""
        for c in self.children.values():
            if c.process.is_alive() and c.process.pid:
                try:
                    os.kill(c.process.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        time.sleep(settle_s)
        return self._report("stacks of every child")

    def kill(self) -> None:
        for c in self.children.values():
            p = c.process
            if p.is_alive():
                p.kill()
        for c in self.children.values():
            c.process.join(timeout=5)

    def join(self, expect_failure: bool = False) -> dict[str, Any]:
        """Wait for every child under the one deadline.

        Returns:
            ``{name: return value}`` with names like ``"worker-0-1"`` (role-group-rank).

        Raises:
            MeshError: a child failed (unless ``expect_failure``), or the deadline passed.
        """
        try:
            while True:
                failed = self._collect(0.05)
                if failed and not expect_failure:
                    raise MeshError(self._report(f"{failed[0].name} failed"))
                if all(c.done or c.error for c in self.children.values()) and all(
                    not c.process.is_alive() or c.error for c in self.children.values()
                ):
                    if expect_failure and not failed:
                        raise MeshError(self._report("expected a failure, but every child succeeded"))
                    return {n: (c.result if c.done else c.error) for n, c in self.children.items()}
                if time.monotonic() > self.deadline:
                    raise MeshError(self._report("the mesh did not finish before its deadline"))
        finally:
            self.kill()
            if self.tmpdir is not None:
                self.tmpdir.cleanup()
                self.tmpdir = None


def _base_env(num_workers: int, num_servers: int, group_size: int, env: Mapping[str, str] | None) -> dict[str, str]:
    from .config import Config

    shape = Config(num_workers=num_workers, num_servers=num_servers, group_size=group_size, root_uri="127.0.0.1")
    out = {k: v for k, v in shape.to_env().items() if k.startswith("DMLC_")}
    out.update(PYTHONUNBUFFERED="1", UCX_WARN_UNUSED_ENV_VARS="n")  # UCX 1.21 reads UCX_MEMTYPE_CACHE (set by ucxx) yet calls it unused
    out.update(env or {})
    return out


def _context() -> Any:
    """A fork server with torch and stepmesh imported, where the platform has one.

    Every child then starts from a warm interpreter instead of importing torch
    again (about 2 s of CPU each); UCX is never initialised before the fork.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stepmesh", "stepmesh.testing"])
    return ctx


def spawn_mesh(
    target: Callable[[NodeContext], Any],
    num_workers: int = 1,
    num_servers: int = 1,
    group_size: int = 1,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    node_env: Callable[[str, int, int], Mapping[str, str]] | None = None,
    args: Any = None,
    skip: Callable[[str, int, int], bool] | None = None,
) -> Mesh:
    """Start a scheduler and ``(num_workers + num_servers) * group_size`` nodes.

    Args:
        target: module-level function run in every worker and server child.
        env: extra environment for every child (the scheduler included).
        node_env: per-node extra environment, from (role, rank, group).
        args: passed to every child as ``ctx.args``.
        skip: (role, rank, group) -> True to leave that node out (a missing node).
        timeout: seconds for the whole mesh, shared by every join.

    Raises:
        MeshError: the scheduler did not report its port in time.
    """
    spawn = _context()
    mesh = Mesh(queue=spawn.Queue(), deadline=time.monotonic() + timeout, spawn=spawn, args=args)
    mesh.tmpdir = tempfile.TemporaryDirectory(prefix="stepmesh-mesh-")
    mesh.base_env = base = _base_env(num_workers, num_servers, group_size, env)
    try:
        sched_env = dict(base, DMLC_ROLE="scheduler", DMLC_PS_ROOT_PORT="0")
        mesh._start("scheduler", None, NodeContext("scheduler", 0, 0, sched_env, args))
        while not mesh.port:
            mesh._drain(0.05)
            sched = mesh.children["scheduler"]
            if sched.error or not sched.process.is_alive() or time.monotonic() > mesh.deadline:
                raise MeshError(mesh._report("the scheduler did not start"))
        for group in range(group_size):
            for role, count in (("server", num_servers), ("worker", num_workers)):
                for rank in range(count):
                    if skip is not None and skip(role, rank, group):
                        continue
                    mesh.add_node(target, role, rank, group, node_env(role, rank, group) if node_env else None)
    except BaseException:
        mesh.kill()
        mesh.tmpdir.cleanup()
        raise
    return mesh


def run_mesh(target: Callable[[NodeContext], Any], **kwargs: Any) -> dict[str, Any]:
    """:func:`spawn_mesh` then :meth:`Mesh.join`; returns every child's return value.

    Raises:
        MeshError: any child failed or the deadline passed (with every child's output).
    """
    expect_failure = kwargs.pop("expect_failure", False)
    return spawn_mesh(target, **kwargs).join(expect_failure=expect_failure)


# ---------------------------------------------------------- commands
# Run commands (``stepmesh launch`` ...) as real processes, and never leave
# them or anything they started behind.


def cli_command(*args: str) -> list[str]:
    """``[python, -m, stepmesh.cli, *args]`` with the running interpreter."""
    return [sys.executable, "-m", "stepmesh.cli", *args]


def session_pids(sid: int) -> list[int]:
    """Pids of every live process in session ``sid`` (Linux ``/proc``; [] elsewhere)."""
    out: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        # fields: state ppid pgrp session ...
        if len(fields) > 3 and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            out.append(int(name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (started by us with a new session), by pid."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait up to ``timeout`` s for every pid to go; returns those still alive."""
    end = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def start_command(
    args: list[str], env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
    cwd: str | None = None,
) -> subprocess.Popen[str]:
    """Start ``args`` in a new session (so :func:`kill_session` can reap everything it starts).

    ``env`` is added to this process's environment. Output is captured as text by default.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        args,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )


def run_command(
    args: list[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    allow_leftovers: bool = False,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` to completion in a new session and return its exit status and output.

    ``env`` is added to this process's environment. At the ``timeout`` (seconds)
    the whole session is killed and an AssertionError carries the output so far.
    Processes still alive in its session after it exited are killed and, unless
    ``allow_leftovers``, reported as an AssertionError too.
    """
    proc = start_command(args, env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            out, err = "", "(output unavailable: pipes still open after the kill)"
        raise AssertionError(
            f"command did not finish within {timeout} s and was killed: {args!r}\n"
            f"--- stdout ---\n{(out or '')[-_OUTPUT_TAIL:]}\n--- stderr ---\n{(err or '')[-_OUTPUT_TAIL:]}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
            proc.wait(5)
    leftovers = wait_gone(session_pids(proc.pid), timeout=2.0)
    if leftovers:
        kill_session(proc.pid)
        if not allow_leftovers:
            raise AssertionError(
                f"{args!r} exited with {proc.returncode} but left processes running: {leftovers}\n"
                f"--- stdout ---\n{out[-_OUTPUT_TAIL:]}\n--- stderr ---\n{err[-_OUTPUT_TAIL:]}"
            )
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_commands(
    commands: Mapping[str, list[str]], timeout: float, env: Mapping[str, str] | None = None
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several commands at once, each in a session of its own, under one deadline.

    ``env`` is added to this process's environment. When one exits non-zero,
    the others are given a few seconds, then killed; at the deadline every
    session still running is killed and an AssertionError carries every
    command's output so far.
    """
    procs = {name: start_command(argv, env) for name, argv in commands.items()}
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            if any(p.returncode not in (None, 0) for p in procs.values()):
                deadline = min(deadline, time.monotonic() + 5.0)
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        late = [name for name, p in procs.items() if p.poll() is None]
        for p in procs.values():
            kill_session(p.pid)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=10)
        out[name] = subprocess.CompletedProcess(commands[name], p.returncode, stdout, stderr)
    if late and all(r.returncode in (0, -9) for r in out.values()):
        report = "\n".join(f"--- {n} (exit {r.returncode}) ---\n{r.stdout[-_OUTPUT_TAIL:]}\n{r.stderr[-_OUTPUT_TAIL:]}"
                           for n, r in out.items())
        raise AssertionError(f"{', '.join(late)} did not finish within {timeout} s and were killed\n{report}")
    return out
