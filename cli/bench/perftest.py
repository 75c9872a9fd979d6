"""The ``perftest`` contender: the C floor, UCX's own ``ucx_perftest -t tag_lat`` (shipped in the libucx wheel).

It prints the one-way latency of a tag ping-pong; a round trip is twice that
(push and pull of different sizes: the two one-way latencies added). Each round
runs a fresh server/client pair, pinned like the other contenders, with the
UCX options of stepmesh's data path, warmed up by at least ``WARMUP``
ping-pongs (a fresh pair's first thousands are slow: on the 2-core VM, 8 KiB
took 1.0-1.5 us one way over 500 ping-pongs after 50, and 0.61-0.73 us after
1,000-5,000); a round gives one sample: the median round trip of its
iterations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from stepmesh.testing import free_port

from .common import data_options
from .model import BenchOptions

__all__ = ["Perftest", "find_perftest"]

_FINAL = re.compile(r"Final:\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)")
_TIMEOUT_S = 120.0
WARMUP = 5000  # ping-pongs before a round's measured ones


def find_perftest() -> tuple[str, str] | None:
    """(ucx_perftest, its library folder) from the libucx wheel ucxx uses, else from PATH; None if neither."""
    try:
        import libucx

        root = os.path.dirname(libucx.__file__)
        exe = os.path.join(root, "bin", "ucx_perftest")
        if os.access(exe, os.X_OK):
            return exe, os.path.join(root, "lib")
    except ImportError:
        pass
    exe = shutil.which("ucx_perftest")
    return (exe, "") if exe else None



@dataclass
class Perftest:
    """Runs ``ucx_perftest`` pairs; ``round(n)`` gives (round trip p50 in us, seconds)."""

    opts: BenchOptions
    exe: str
    libdir: str

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({f"UCX_{k}": v for k, v in data_options().items()})
        env["UCX_WARN_UNUSED_ENV_VARS"] = "n"
        if self.libdir:
            env["LD_LIBRARY_PATH"] = self.libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        return env

    def _one_way(self, nbytes: int, n: int) -> tuple[float, float]:
        """(median one-way latency in us, seconds) of ``n`` ping-pongs of ``nbytes``."""
        port = free_port()
        common = ["-t", "tag_lat", "-s", str(max(nbytes, 1)), "-n", str(n), "-w", str(max(n // 10, WARMUP)), "-p", str(port)]
        if self.opts.device.startswith("cuda"):
            common += ["-m", "cuda"]
        env = self._env()
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

        def pinned(i: int):  # type: ignore[no-untyped-def]
            if not self.opts.pin or not cores:
                return None
            return lambda: os.sched_setaffinity(0, {cores[i % len(cores)]})

        server = subprocess.Popen([self.exe, *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, preexec_fn=pinned(0))
        try:
            client = None
            for _ in range(50):  # the server listens within a moment; retry the client until it does
                client = subprocess.run([self.exe, "127.0.0.1", *common], env=env, capture_output=True, text=True,
                                        timeout=_TIMEOUT_S, preexec_fn=pinned(1))
                if client.returncode == 0:
                    break
                if "Connection refused" not in client.stdout + client.stderr and "connect" not in client.stderr:
                    break
            assert client is not None
            server.wait(timeout=_TIMEOUT_S)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        m = _FINAL.search(client.stdout)
        if client.returncode != 0 or m is None:
            tail = (client.stdout + client.stderr).strip().splitlines()[-3:]
            raise RuntimeError(f"ucx_perftest failed ({client.returncode}): {' | '.join(tail)}")
        return float(m.group(2)), int(m.group(1)) * float(m.group(4)) * 2 / 1e6

    def round(self, n: int) -> tuple[float, float]:
        wl = self.opts.workload
        out, t_out = self._one_way(wl.push_bytes, n)
        if wl.pull_bytes == wl.push_bytes:
            return 2 * out, t_out
        back, t_back = self._one_way(wl.pull_bytes, n)
        return out + back, (t_out + t_back) / 2
