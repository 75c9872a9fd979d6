"""The ``stepmesh`` command line, run as real processes (scheduler, info, launch)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from stepmesh.cli import main

from stepmesh.testing import cli_command, kill_session, run_command, start_command, wait_gone

# Every child of these tests sees this; no stray DMLC_* from the caller's shell.
ENV = {
    "STEPMESH_INIT_TIMEOUT_MS": "20000",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DMLC_") or key in ("STEPMESH_GPU", "STEPMESH_TRANSPORTS", "STEPMESH_TOPOLOGY"):
            monkeypatch.delenv(key)


def _started_pids(stderr: str) -> dict[str, int]:
    """``{label: pid}`` from launch -v's "[launch] started LABEL (pid N)" lines."""
    return {m[0]: int(m[1]) for m in re.findall(r"\[launch\] started (.+?) \(pid (\d+)\)", stderr)}


# ------------------------------------------------------------------- argument errors
@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "args, message",
    [
        (["launch"], "missing the command to run"),
        (["launch", "--role", "worker", "--", "true"], "--role worker needs --scheduler-host and --port"),
        (["launch", "--role", "worker", "--port", "5000", "--", "true"], "needs --scheduler-host"),
        (["launch", "--role", "both", "--", "true"], "'both' is not one of"),
        (["launch", "--workers", "0", "--", "true"], "0 is not in the range x>=1"),
        (["launch", "-e", "NOEQUALS", "--", "true"], "'NOEQUALS' is not KEY=VALUE"),
        (["launch", "-e", "DMLC_NUM_WORKER=3", "--", "true"], "use --workers"),
        (["launch", "--", "no-such-command-xyz"], "command not found: 'no-such-command-xyz'"),
        (["scheduler", "--port", "70000"], "70000 is not in the range"),
    ],
)
def test_usage_errors_are_clear(args: list[str], message: str) -> None:
    # Validation only: these fail before anything is started.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


@pytest.mark.timeout(20)
def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"stepmesh \d+\.\d+\.\d+\S*\n", result.output), result.output


# ----------------------------------------------------------------------------- info
@pytest.mark.timeout(30)
def test_info_table() -> None:
    r = run_command(cli_command("info"), timeout=25, env=ENV)
    assert r.returncode == 0, r.stderr
    for word in ("stepmesh", "python", "torch", "numpy", "ucxx", "UCX", "UCX transports:", "devices:", "backend:"):
        assert word in r.stdout, (word, r.stdout)
    # UCX always has at least its loopback transport and tcp on loopback here
    assert re.search(r"UCX transports: .*\btcp\b", r.stdout), r.stdout


@pytest.mark.timeout(30)
def test_info_json() -> None:
    r = run_command(cli_command("info", "--json"), timeout=25, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    versions = report["versions"]
    assert set(versions) >= {"stepmesh", "python", "torch", "numpy", "ucxx", "ucx"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["ucx"]), versions
    assert re.search(r"/libucp\.so[.\d]* \(bound at run time by the compiled core\)$", versions["libucp"]), versions
    assert re.search(r"_core/core\..*\.so \(\d+ wire constants, checked\)$", versions["core"]), versions
    assert report["ucx"]["error"] is None
    assert "tcp" in report["ucx"]["transports"]
    assert {"transport": "tcp", "device": "lo"} in report["ucx"]["resources"]
    devices = report["devices"]
    assert isinstance(devices["cuda_available"], bool) and devices["count"] == len(devices["names"])
    assert report["backend"]["name"] == ("cuda" if devices["cuda_available"] else "cpu")


# ------------------------------------------------------------------------ scheduler
@pytest.mark.timeout(30)
def test_scheduler_rejects_bad_environment() -> None:
    # the installed console script (the other tests use python -m stepmesh.cli)
    script = os.path.join(os.path.dirname(sys.executable), "stepmesh")
    if not os.path.exists(script):
        pytest.skip(f"no console script at {script}")
    r = run_command([script, "scheduler", "--port", "0"], timeout=25, env=dict(ENV, DMLC_NUM_WORKER="0"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "DMLC_NUM_WORKER" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.timeout(30)
def test_scheduler_writes_port_file_then_reports_an_incomplete_mesh() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        env = dict(ENV, STEPMESH_INIT_TIMEOUT_MS="1500")
        r = run_command(cli_command("scheduler", "--port", "0", "--port-file", port_file), timeout=25, env=env)
        assert os.listdir(tmp) == ["port"]  # no temporary file left beside it
        with open(port_file) as f:
            port = int(f.read())
    assert 0 < port < 65536
    assert r.stdout.splitlines()[0] == f"stepmesh scheduler listening on port {port}", r.stdout
    # nobody joined: a bounded, clear failure
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "STEPMESH_INIT_TIMEOUT_MS" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- launch
_MESH_SCRIPT = """
import os, stepmesh
stepmesh.init()
stepmesh.barrier()
print("joined", os.environ["DMLC_ROLE"], os.environ["DMLC_NODE_RANK"], flush=True)
stepmesh.stop()
"""


@pytest.mark.timeout(90)
def test_launch_joint_two_by_two() -> None:
    r = run_command(
        cli_command("launch", "--workers", "2", "--servers", "2", "--timeout", "75", "--", sys.executable, "-c", _MESH_SCRIPT),
        timeout=85,
        env=ENV,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert any(re.fullmatch(r"\[scheduler\] stepmesh scheduler listening on port \d+", ln) for ln in lines), r.stdout
    for role in ("server", "worker"):
        for rank in (0, 1):
            assert f"[{role} {rank}] joined {role} {rank}" in lines, r.stdout
    # every line of output is prefixed
    for ln in lines + r.stderr.splitlines():
        assert re.match(r"\[(scheduler|server \d|worker \d|launch)\] ", ln), ln


_FAIL_SCRIPT = """
import os, sys, time
if os.environ["DMLC_ROLE"] == "worker" and os.environ["DMLC_NODE_RANK"] == "1":
    time.sleep(0.5)
    print("giving up", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_launch_stops_everyone_when_one_child_fails() -> None:
    t0 = time.monotonic()
    r = run_command(
        cli_command("launch", "-v", "--workers", "2", "--servers", "1", "--grace", "2", "--", sys.executable, "-c", _FAIL_SCRIPT),
        timeout=55,
        env=ENV,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert elapsed < 60, elapsed  # not the 120 s the others sleep
    assert "[worker 1] giving up" in r.stderr, r.stderr
    assert re.search(r"\[launch\] worker 1 \(pid \d+\) exited with code 3", r.stderr), r.stderr
    pids = _started_pids(r.stderr)
    assert set(pids) == {"scheduler", "server 0", "worker 0", "worker 1"}, r.stderr
    assert wait_gone(list(pids.values()), timeout=3) == []


_SLEEP_SCRIPT = """
import os, time
keys = ("DMLC_ROLE", "DMLC_NODE_RANK", "STEPMESH_GPU", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER",
        "DMLC_GROUP_SIZE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "EXTRA")
print("pid", os.getpid(), " ".join(k + "=" + os.environ.get(k, "-") for k in keys), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(30)
def test_launch_timeout_kills_a_command_that_never_ends() -> None:
    t0 = time.monotonic()
    args = cli_command(
        "launch", "-v", "--role", "worker", "--scheduler-host", "127.0.0.1", "--port", "1",
        "--timeout", "3", "--", sys.executable, "-c", _SLEEP_SCRIPT,
    )  # fmt: skip
    r = run_command(args, timeout=25, env=ENV)
    assert r.returncode == 124, (r.stdout, r.stderr)
    assert time.monotonic() - t0 < 20
    assert "timed out after 3 s (--timeout)" in r.stderr, r.stderr
    pids = _started_pids(r.stderr)
    assert list(pids) == ["worker 0"]
    assert wait_gone(list(pids.values()), timeout=3) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_to_launch_takes_its_children_down(signum: int) -> None:
    """SIGTERM is forwarded; even SIGKILL leaves nothing behind (PR_SET_PDEATHSIG)."""
    args = cli_command(
        "launch", "--role", "worker", "--scheduler-host", "127.0.0.1", "--port", "4242",
        "--workers", "2", "--servers", "3", "--group-size", "2", "--env", "EXTRA=yes",
        "--", sys.executable, "-c", _SLEEP_SCRIPT,
    )  # fmt: skip
    with tempfile.TemporaryFile("w+") as out:
        proc = start_command(args, env=ENV, stdout=out)
        try:
            deadline = time.monotonic() + 20
            lines: list[str] = []
            while len(lines) < 4 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
                out.seek(0)
                lines = [ln for ln in out.read().splitlines() if " pid " in ln]
            assert len(lines) == 4, (lines, proc.poll())
            proc.send_signal(signum)
            proc.wait(15)
            _, err = proc.communicate()
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)
                proc.wait(5)
    # labels, ranks, groups and the environment each child saw
    seen = {}
    for ln in lines:
        m = re.fullmatch(r"\[worker (\d)\.g(\d)\] pid (\d+) (.*)", ln)
        assert m, ln
        env = dict(kv.split("=", 1) for kv in m[4].split())
        seen[(int(m[1]), int(m[2]))] = int(m[3])
        assert env["DMLC_ROLE"] == "worker" and env["DMLC_NODE_RANK"] == m[1] and env["STEPMESH_GPU"] == m[2]
        assert (env["DMLC_NUM_WORKER"], env["DMLC_NUM_SERVER"], env["DMLC_GROUP_SIZE"]) == ("2", "3", "2")
        assert (env["DMLC_PS_ROOT_URI"], env["DMLC_PS_ROOT_PORT"], env["EXTRA"]) == ("127.0.0.1", "4242", "yes")
    assert set(seen) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "received SIGTERM" in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert wait_gone(list(seen.values()), timeout=5) == []


_INTERRUPTIBLE = "import time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.05)\n"


@pytest.mark.timeout(40)
def test_ctrl_c_on_launch_prints_one_line_per_child_not_their_tracebacks() -> None:
    """(Each child's KeyboardInterrupt traceback used to come through: about 70 lines for a small mesh.)"""
    args = cli_command(
        "launch", "--role", "worker", "--scheduler-host", "127.0.0.1", "--port", "4242",
        "--workers", "3", "--servers", "1", "--", sys.executable, "-c", _INTERRUPTIBLE,
    )  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start_command(args, env=ENV, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 20
            ready = 0
            while ready < 3 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
                out.seek(0)
                ready = sum(line.endswith("ready") for line in out.read().splitlines())
            assert ready == 3, proc.poll()
            proc.send_signal(signal.SIGINT)
            proc.wait(15)
            err.seek(0)
            text = err.read()
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)
                proc.wait(5)
    assert proc.returncode == 128 + signal.SIGINT, text
    assert "Traceback" not in text and "KeyboardInterrupt\n" not in text, text
    stopped = [line for line in text.splitlines() if "stopped by Ctrl-C" in line]
    assert sorted(line.split("]")[0] for line in stopped) == ["[worker 0", "[worker 1", "[worker 2"], text
    assert len(text.splitlines()) <= 6, text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_readme_launch_runs_from_inside_the_checkout_and_from_elsewhere(where: str, tmp_path) -> None:
    """However stepmesh is installed (editable, or a wheel as CI does), what launch starts finds stepmesh.cli.

    (A non-editable install once failed from inside the checkout in 0.7 s: the
    source stepmesh/ shadowed the installed package, and cli/ is not in it.)
    """
    import stepmesh

    root = Path(__file__).resolve().parents[1]
    example = root / "examples" / "afd_pipeline.py"
    cwd = root if where == "checkout" else tmp_path
    r = run_command(
        cli_command("launch", "--workers", "2", "--servers", "2", "--", sys.executable, str(example), "--steps", "1"),
        timeout=100, env=ENV, cwd=str(cwd),
    )
    assert r.returncode == 0, (stepmesh.__file__, r.stdout[-3000:], r.stderr[-3000:])
    ok = [line for line in r.stdout.splitlines() if ": OK: all " in line]
    assert len(ok) == 2, r.stdout


def test_package_metadata_names_license_home_page_and_authors() -> None:
    """(pip show stepmesh once showed none of them.)"""
    from importlib.metadata import metadata

    meta = metadata("stepmesh")
    assert meta["License-Expression"] == "Apache-2.0" or "Apache" in (meta["License"] or "")
    assert meta["Author"] or meta["Author-email"]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls.get("Homepage", "").startswith("https://") and "Original StepMesh" in urls
