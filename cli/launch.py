"""``stepmesh launch``: start a local scheduler, servers and workers running one command.

The Python equivalent of StepMesh's ``run_single_gpu.sh`` / ``run_multi_gpu.sh``
(``ROLE=joint|server|worker``). Every child gets StepMesh's environment
(``DMLC_ROLE``, ``DMLC_NODE_RANK``, ``STEPMESH_GPU``, ``DMLC_NUM_WORKER`` ...),
each line it prints is prefixed with its role and rank, signals are forwarded,
and the first child that fails brings the others down.

Children run in their own process groups (so a terminal's Ctrl-C reaches them
once, forwarded by the launcher) and, on Linux, with ``PR_SET_PDEATHSIG`` so
they die with the launcher even when it is killed with SIGKILL. Whatever
happens, every child (and whatever it left in its process group) is killed by
pid before :meth:`Launcher.run` returns.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

__all__ = [
    "LAUNCH_ROLES",
    "RESERVED_ENV",
    "LaunchSpec",
    "Launcher",
    "child_label",
    "describe_exit",
    "exit_status",
]

LAUNCH_ROLES = ("joint", "server", "worker")
# Set by launch itself for every child; --env may not override them.
RESERVED_ENV = {
    "DMLC_ROLE": "--role",
    "DMLC_NODE_RANK": "(set per child)",
    "STEPMESH_GPU": "(set per child)",
    "DMLC_NUM_WORKER": "--workers",
    "DMLC_NUM_SERVER": "--servers",
    "DMLC_GROUP_SIZE": "--group-size",
    "DMLC_PS_ROOT_URI": "--scheduler-host",
    "DMLC_PS_ROOT_PORT": "--port",
}
PORT_WAIT_S = 60.0  # the scheduler must be listening within this (or --timeout)
SCHEDULER_LINGER_S = 5.0  # after every node exited 0, the scheduler's time to finish
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 1 << 16  # longer lines are split (each part prefixed)


class _Abort(Exception):
    """Stop the run: terminate every child, then exit with ``code``."""

    def __init__(self, code: int, message: str, forwarded: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.forwarded = forwarded  # the children already got a signal


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch (already validated by the command line)."""

    command: tuple[str, ...]
    role: str = "joint"
    num_workers: int = 1
    num_servers: int = 1
    group_size: int = 1
    scheduler_host: str | None = None
    port: int | None = None
    timeout: float | None = None
    grace: float = 3.0
    env: Mapping[str, str] = field(default_factory=dict)
    verbose: bool = False


def child_label(role: str, rank: int | None = None, group: int | None = None, group_size: int = 1) -> str:
    """``scheduler``, ``server 0``, ``worker 1`` or, with instance groups, ``worker 1.g0``."""
    if rank is None:
        return role
    if group_size > 1:
        return f"{role} {rank}.g{group}"
    return f"{role} {rank}"


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL`` (for a ``Popen.returncode``)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """The launcher's exit status for a failed child's ``returncode`` (never 0)."""
    if code < 0:
        return 128 + (-code)
    return code if 0 < code < 256 else 1


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _local_address() -> str:
    """This host's address on its default route (no packet is sent), else its name."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            return str(s.getsockname()[0])
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _child_setup(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with the launcher (Linux only).

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits;
    children are only ever started from the launcher's main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    sigkill = int(signal.SIGKILL)

    def setup() -> None:  # runs in the child between fork and exec: keep it minimal
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), sigkill)

    return setup


class _Output:
    """Whole-line writes from many threads to the launcher's stdout/stderr.

    With ``hold``, writers wait until :meth:`release` (so that the scheduler
    address is the first line of ``--role server``'s stdout).
    """

    def __init__(self, stdout: IO[Any], stderr: IO[Any], hold: bool) -> None:
        self._streams = {1: stdout, 2: stderr}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._broken: set[int] = set()
        if not hold:
            self._ready.set()

    def release(self) -> None:
        self._ready.set()

    def write(self, fd: int, data: bytes, wait: bool = True) -> None:
        if wait:
            self._ready.wait()
        with self._lock:
            if fd in self._broken:
                return
            stream = self._streams[fd]
            try:
                buf = getattr(stream, "buffer", None)
                if buf is not None:
                    stream.flush()
                    buf.write(data)
                    buf.flush()
                else:
                    stream.write(data.decode("utf-8", "replace"))
                    stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._broken.add(fd)  # keep draining the children's pipes anyway

    def say(self, text: str, fd: int = 2, wait: bool = False) -> None:
        """A line of the launcher's own (``[launch] ...`` on stderr by default)."""
        self.write(fd, f"[launch] {text}\n".encode(), wait=wait)


@dataclass(eq=False)
class _Child:
    label: str
    role: str
    popen: subprocess.Popen[bytes]
    threads: list[threading.Thread] = field(default_factory=list)
    reported: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def join_output(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))


class Launcher:
    """Runs one :class:`LaunchSpec` to completion; :meth:`run` returns the exit status.

    Exit status: 0 only when every child exited 0; the failed child's code (or
    128 + signal) when one failed; 124 when ``timeout`` passed; 128 + signal when
    the launcher was interrupted; 126/127 when the command cannot be executed.
    """

    def __init__(self, spec: LaunchSpec, stdout: IO[Any] | None = None, stderr: IO[Any] | None = None) -> None:
        self.spec = spec
        self._out = _Output(
            stdout if stdout is not None else sys.stdout,
            stderr if stderr is not None else sys.stderr,
            hold=spec.role == "server",
        )
        self._children: list[_Child] = []
        self._scheduler: _Child | None = None
        self._signal: int | None = None
        self._deadline: float | None = None
        self._old_handlers: dict[int, Any] = {}
        self._setup = _child_setup(os.getpid())
        self._tmpdir: str | None = None

    # ------------------------------------------------------------------ public
    def run(self) -> int:
        """Start everything, supervise, and clean up; never leaves a child behind."""
        self._install_signal_handlers()
        try:
            try:
                return self._run()
            except _Abort as a:
                self._out.release()
                self._out.say(a.message)
                self._terminate(self._children, already_signalled=a.forwarded)
                return a.code
        finally:
            self._out.release()
            self._kill_all()
            end = time.monotonic() + 2.0  # let the pumps print what is left in the pipes
            for c in self._children:
                c.join_output(max(0.0, end - time.monotonic()))
            self._restore_signal_handlers()
            if self._tmpdir is not None:
                try:
                    for name in os.listdir(self._tmpdir):
                        os.unlink(os.path.join(self._tmpdir, name))
                    os.rmdir(self._tmpdir)
                except OSError:
                    pass

    @property
    def pids(self) -> dict[str, int]:
        """``{label: pid}`` of every child started so far."""
        return {c.label: c.pid for c in self._children}

    # --------------------------------------------------------------- the run
    def _run(self) -> int:
        spec = self.spec
        if spec.timeout is not None:
            self._deadline = time.monotonic() + spec.timeout
        uri = spec.scheduler_host or "127.0.0.1"
        if spec.role in ("joint", "server"):
            port = self._start_scheduler(uri)
        else:
            assert spec.port is not None and spec.scheduler_host is not None
            port = spec.port
        if spec.role == "server":
            host = spec.scheduler_host or _local_address()
            self._out.write(1, f"{host}:{port}\n".encode(), wait=False)
            self._out.say(
                f"scheduler at {host}:{port}; start the workers with: stepmesh launch --role worker "
                f"--scheduler-host {host} --port {port} --workers {spec.num_workers} "
                f"--servers {spec.num_servers} --group-size {spec.group_size} -- CMD..."
            )
            self._out.release()
        elif spec.role == "joint" and spec.verbose:
            self._out.say(f"scheduler at {uri}:{port}")

        roles: list[tuple[str, int]] = []
        if spec.role in ("joint", "server"):
            roles.append(("server", spec.num_servers))
        if spec.role in ("joint", "worker"):
            roles.append(("worker", spec.num_workers))
        for group in range(spec.group_size):
            for role, count in roles:
                for rank in range(count):
                    self._check()
                    env = self._env(uri, port, role=role, node_rank=rank, gpu=group)
                    label = child_label(role, rank, group, spec.group_size)
                    self._start(label, role, list(spec.command), env)
        return self._supervise()

    def _env(self, uri: str, port: int, **fields: Any) -> dict[str, str]:
        """A child's environment: this one's, --env, and the child's whole configuration (``Config.to_env``).

        The configuration is resolved here, so that a bad ``STEPMESH_*``/``DMLC_*``
        variable fails once, in the launcher, naming the variable.
        """
        from stepmesh import Config

        spec = self.spec
        env = dict(os.environ)
        env.update(spec.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # children's lines show up as printed
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # UCX 1.21 reads UCX_MEMTYPE_CACHE (set by ucxx) yet calls it unused
        try:
            cfg = Config.from_env(
                environ=env, num_workers=spec.num_workers, num_servers=spec.num_servers, group_size=spec.group_size,
                root_uri=uri, root_port=port, **fields,
            )
        except Exception as e:
            raise _Abort(2, f"invalid configuration: {e}") from None
        resolved = cfg.to_env()
        if "STEPMESH_PROGRESS" not in env:  # each child picks its own from the cores it may use
            resolved.pop("STEPMESH_PROGRESS", None)
        env.update(resolved)
        return env

    def _start_scheduler(self, uri: str) -> int:
        spec = self.spec
        self._tmpdir = tempfile.mkdtemp(prefix="stepmesh-launch-")
        port_file = os.path.join(self._tmpdir, "port")
        argv = [
            sys.executable, "-m", "stepmesh.cli", "scheduler",
            "--port", str(spec.port if spec.port is not None else 0),
            "--host", uri,
            "--workers", str(spec.num_workers),
            "--servers", str(spec.num_servers),
            "--group-size", str(spec.group_size),
            "--port-file", port_file,
        ]  # fmt: skip
        env = self._env(uri, spec.port or 0, role="scheduler", node_rank=None)
        env.pop("DMLC_NODE_RANK", None)
        sched = self._start("scheduler", "scheduler", argv, env)
        self._scheduler = sched
        wait_until = time.monotonic() + PORT_WAIT_S
        while True:
            try:
                with open(port_file) as f:
                    text = f.read().strip()
                return int(text)
            except (OSError, ValueError):
                pass
            self._check()  # the scheduler failing, a signal or --timeout end the wait
            if time.monotonic() > wait_until:
                raise _Abort(1, f"the scheduler did not report its port within {PORT_WAIT_S:g} s")
            time.sleep(0.02)

    def _supervise(self) -> int:
        nodes_done_at: float | None = None
        while True:
            self._check()
            nodes = [c for c in self._children if c is not self._scheduler]
            if all(c.popen.returncode == 0 for c in nodes):
                sched = self._scheduler
                if sched is None or sched.popen.returncode is not None:
                    return 0
                now = time.monotonic()
                if nodes_done_at is None:
                    nodes_done_at = now
                elif now - nodes_done_at > SCHEDULER_LINGER_S:
                    self._out.say(
                        f"every node exited 0 but the scheduler is still running after "
                        f"{SCHEDULER_LINGER_S:g} s (did the command call stepmesh.stop()?): stopping it"
                    )
                    self._terminate([sched])
                    return 0
            time.sleep(_POLL_S)

    def _check(self) -> None:
        """Raise :class:`_Abort` on a signal, a failed child, or the deadline."""
        if self._signal is not None:  # children dying of the forwarded signal are no news
            running = sum(1 for c in self._children if c.running)
            raise _Abort(
                128 + self._signal,
                f"received {_signal_name(self._signal)}: forwarded it to {running} running process(es)",
                forwarded=True,
            )
        for c in self._children:
            if c.reported:
                continue
            code = c.popen.poll()
            if code is None:
                continue
            c.reported = True
            if code == 0:
                if self.spec.verbose:
                    self._out.say(f"{c.label} (pid {c.pid}) exited with code 0")
                continue
            c.join_output(0.5)  # its last words come before ours
            others = sum(1 for o in self._children if o.running)
            tail = f": stopping {others} other process(es)" if others else ""
            raise _Abort(exit_status(code), f"{c.label} (pid {c.pid}) {describe_exit(code)}{tail}")
        if self._deadline is not None and time.monotonic() > self._deadline:
            running = [c.label for c in self._children if c.running]
            raise _Abort(
                124,
                f"timed out after {self.spec.timeout:g} s (--timeout); killing "
                + (", ".join(running) if running else "nothing (no child running)"),
            )

    # -------------------------------------------------------------- children
    def _start(self, label: str, role: str, argv: list[str], env: dict[str, str]) -> _Child:
        try:
            popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                process_group=0,
                preexec_fn=self._setup,
            )
        except FileNotFoundError as e:
            raise _Abort(127, f"cannot start {label}: {argv[0]!r} not found ({e.strerror})") from None
        except PermissionError as e:
            raise _Abort(126, f"cannot start {label}: {argv[0]!r} is not executable ({e.strerror})") from None
        except OSError as e:
            raise _Abort(126, f"cannot start {label}: {e}") from None
        child = _Child(label, role, popen)
        self._children.append(child)
        prefix = f"[{label}] ".encode()
        assert popen.stdout is not None and popen.stderr is not None
        for fd, pipe in ((1, popen.stdout), (2, popen.stderr)):
            t = threading.Thread(
                target=self._pump, args=(pipe, prefix, fd), name=f"launch-{label}-{fd}", daemon=True
            )
            t.start()
            child.threads.append(t)
        if self.spec.verbose:
            self._out.say(f"started {label} (pid {popen.pid}): {shlex.join(argv)}")
        return child

    def _pump(self, pipe: IO[bytes], prefix: bytes, fd: int) -> None:
        held: list[bytes] = []  # stderr after a forwarded Ctrl-C: one line instead of a KeyboardInterrupt traceback
        with pipe:
            for raw in iter(lambda: pipe.readline(_LINE_LIMIT), b""):
                if not raw.endswith(b"\n"):
                    raw += b"\n"
                if fd == 2 and self._signal == signal.SIGINT:
                    held.append(raw)
                    continue
                self._out.write(fd, prefix + raw)
        if any(b"KeyboardInterrupt" in line for line in held):
            self._out.write(fd, prefix + b"stopped by Ctrl-C (its KeyboardInterrupt traceback is not shown)\n")
        else:
            for raw in held:
                self._out.write(fd, prefix + raw)

    def _send(self, child: _Child, signum: int) -> None:
        """Signal the child's process group (it leads one), or the child alone."""
        if child.popen.returncode is not None:
            return
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(child.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _terminate(self, children: Sequence[_Child], already_signalled: bool = False) -> None:
        """SIGTERM (unless already signalled), wait up to the grace period, then SIGKILL."""
        live = [c for c in children if c.running]
        if not already_signalled:
            for c in live:
                self._send(c, signal.SIGTERM)
        end = time.monotonic() + self.spec.grace
        while live and time.monotonic() < end:
            time.sleep(0.02)
            live = [c for c in live if c.running]
        for c in live:
            self._send(c, signal.SIGKILL)
        for c in live:
            try:
                c.popen.wait(5)
            except subprocess.TimeoutExpired:
                self._out.say(f"{c.label} (pid {c.pid}) survived SIGKILL for 5 s")

    def _kill_all(self) -> None:
        """SIGKILL every child still running and whatever is left in its process group."""
        for c in self._children:
            if c.running:
                self._send(c, signal.SIGKILL)
            try:
                os.killpg(c.pid, signal.SIGKILL)  # grandchildren left in its group
            except (ProcessLookupError, PermissionError):
                pass
        for c in self._children:
            try:
                c.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass

    # --------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Forward the first signal to every child; a second one kills them."""
        if self._signal is None:
            self._signal = signum
            forward = signum
        else:
            forward = signal.SIGKILL
        for c in self._children:
            self._send(c, forward)
