"""Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own
IPC and mount namespace (private /dev/shm), so UCX can only use the network between them.

Scheduler and servers on host A, workers on host B. Skipped, with the reason, where
namespaces cannot be made (not root, no `ip netns`, no `unshare`). Everything created is
removed even when a test fails; the processes are killed by session id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepmesh.testing import free_port, kill_session, start_command

HERE = Path(__file__).parent
SUBNET = "10.231.{}.{}"


def _can_make_namespaces() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    probe = f"smprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` failed here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


REASON = _can_make_namespaces()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "namespaces available")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    tag = f"{os.getpid() % 10000}"
    a, b = f"smA{tag}", f"smB{tag}"
    va, vb = f"sva{tag}", f"svb{tag}"
    octet = os.getpid() % 250 + 1
    addr_a, addr_b = SUBNET.format(octet, 1), SUBNET.format(octet, 2)
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        _ip("-n", a, "addr", "add", f"{addr_a}/24", "dev", va)
        _ip("-n", b, "addr", "add", f"{addr_b}/24", "dev", vb)
        for ns, dev in ((a, va), (b, vb)):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": a, "b": b, "dev_a": va, "dev_b": vb, "addr_a": addr_a, "addr_b": addr_b}
    finally:
        for ns in (a, b):  # deleting a namespace removes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)



class _Cluster:
    def __init__(self, hosts: dict[str, str], workers: int, servers: int, mode: str, tmp: Path) -> None:
        self.hosts, self.tmp, self.procs = hosts, tmp, []
        port = free_port()  # inside namespace A nothing else listens anyway
        self.env = {
            "DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers), "DMLC_PS_ROOT_URI": hosts["addr_a"],
            "DMLC_PS_ROOT_PORT": str(port), "STEPMESH_INIT_TIMEOUT_MS": "30000", "UCX_WARN_UNUSED_ENV_VARS": "n",
            "UCX_PROTO_INFO": "y", "NS_MODE": mode, "NS_READY_FILE": str(tmp / "ready"), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        }
        self._start("a", "hostA", "scheduler", [sys.executable, "-m", "stepmesh.cli", "scheduler"])
        for r in range(servers):
            self._start("a", "hostA", "server", [sys.executable, str(HERE / "netns_node.py")], r, hosts["dev_a"])
        for r in range(workers):
            self._start("b", "hostB", "worker", [sys.executable, str(HERE / "netns_node.py")], r, hosts["dev_b"])

    def _start(self, side: str, hostname: str, role: str, cmd: list[str], rank: int = 0, dev: str = "") -> None:
        env = dict(self.env, DMLC_ROLE=role, DMLC_NODE_RANK=str(rank))
        if dev:
            env["STEPMESH_NET_DEVICES"] = dev
        inner = f"mount -t tmpfs tmpfs /dev/shm && hostname {hostname} && exec \"$@\""
        args = ["ip", "netns", "exec", self.hosts[side], "unshare", "--ipc", "--mount", "--uts", "sh", "-c", inner, "sh", *cmd]
        log = open(self.tmp / f"{role}-{rank}.log", "w")
        self.procs.append((f"{role}-{rank}", start_command(args, env, stdout=log, stderr=subprocess.STDOUT)))

    def wait(self, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        for _, p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        return self.logs()

    def logs(self) -> dict[str, str]:
        return {name: (self.tmp / f"{name}.log").read_text() for name, _ in self.procs}

    def kill(self) -> None:
        for _, p in self.procs:
            kill_session(p.pid)
            p.wait(5)


def _results(logs: dict[str, str]) -> dict[str, str]:
    return {n: next((ln for ln in text.splitlines() if ln.startswith("RESULT")), "") for n, text in logs.items()}


def _transports(logs: dict[str, str]) -> set[str]:
    """The transports UCX chose for tagged messages (from UCX_PROTO_INFO)."""
    out = set()
    for text in logs.values():
        for line in text.splitlines():
            if line.rstrip().endswith("|") and "/" in line.split("|")[-2]:
                out.add(line.split("|")[-2].strip().split("/")[0])
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("workers", "servers", "mode"), [(1, 1, "sum"), (2, 2, "mxn")], ids=["sum", "mxn"])
def test_workers_and_servers_on_separate_hosts_over_tcp(hosts, tmp_path, workers, servers, mode):
    cluster = _Cluster(hosts, workers, servers, mode, tmp_path)
    try:
        logs = cluster.wait(90)
    finally:
        cluster.kill()
    results = _results(logs)
    assert all(r.startswith("RESULT ok") for n, r in results.items() if n != "scheduler-0"), logs
    assert _transports(logs) == {"tcp"}, _transports(logs)  # no shared memory between the "hosts"


@pytest.mark.timeout(120)
def test_cut_link_is_a_peer_error_within_the_bound(hosts, tmp_path):
    cluster = _Cluster(hosts, 2, 1, "cut", tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready.{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.1)
        time.sleep(0.5)  # a few push_pulls go through
        t_cut = time.time()
        _ip("-n", hosts["b"], "link", "set", hosts["dev_b"], "down")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            results = _results(cluster.logs())
            if all(results[f"worker-{r}"] for r in range(2)):
                break
            time.sleep(0.1)
    finally:
        cluster.kill()
    for r in range(2):
        line = results[f"worker-{r}"]
        assert line.startswith("RESULT peer-error"), cluster.logs()
        assert float(line.split()[2]) - t_cut < 3.0, (line, t_cut)
