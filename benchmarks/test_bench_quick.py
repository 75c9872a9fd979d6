"""``stepmesh bench`` in a quick mode: the harness works end to end (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from stepmesh.testing import cli_command, run_command

QUICK = ["--iters", "40", "--warmup", "5", "--rounds", "2", "--no-pin"]


@pytest.mark.timeout(240)
def test_bench_small_writes_table_json_with_every_contender(tmp_path):
    out = tmp_path / "bench.json"
    r = run_command(
        cli_command("bench", "--preset", "small", "--progress", "blocking", *QUICK, "--json", str(out)),
        timeout=200,
    )
    assert r.returncode == 0, r.stderr
    for name in ("stepmesh", "protocol", "ucxx", "perftest", "gloo"):
        assert any(line.startswith(name) for line in r.stdout.splitlines()), r.stdout
    # What cannot run here is said to be "not run", with why: never silently dropped
    for name in ("nixl", "nccl"):
        line = [ln for ln in r.stdout.splitlines() if ln.startswith(name)]
        assert line and ("not run" in line[0] or line[0].split()[1].replace(".", "").isdigit()), r.stdout
    assert "measured on" in r.stdout and "stepmesh p50 / its p50" in r.stdout
    assert "round trip by stage" in r.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "stepmesh-bench/2"
    env = data["environment"]
    assert env["stepmesh"] and env["torch"] and env["ucx"] and env["host"] and env["date"] and env["core"]
    assert env["memtype_cache"] in ("off", "on (try)", "on")  # as UCX read it: ucxx sets n unless it was set
    assert data["workload"]["name"] == "small"
    for name in ("stepmesh", "protocol", "ucxx", "gloo"):
        entry = data["contenders"][name]
        assert entry["stats"]["samples"] == 40 and len(entry["latencies_us"]) == 40
        assert 0 < entry["stats"]["p50_us"] <= entry["stats"]["p99_us"] <= entry["stats"]["max_us"]
    assert data["contenders"]["ucxx"]["stepmesh_over_this_p50"] > 0
    perftest = data["contenders"]["perftest"]  # the C floor: one sample per round
    assert len(perftest["latencies_us"]) == 2 and perftest["stats"]["p50_us"] > 0
    stages = data["trace_breakdown_us"]["server 0"]
    assert set(stages) >= {"request send", "request network", "response send"}
    by_round = data["trace_breakdown_by_round_us"]  # one per measured round, as the C floor's samples
    assert len(by_round) == 2 and all(set(r["server 0"]) == set(stages) for r in by_round), by_round

    # the saved result prints the same table elsewhere, and saves back unchanged
    again = tmp_path / "again.json"
    r2 = run_command(cli_command("bench", "--from-json", str(out), "--json", str(again)), timeout=60)
    assert r2.returncode == 0, r2.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith(("stepmesh ", "ucxx ", "gloo "))]
    assert table and all(line in r2.stdout.splitlines() for line in table), (table, r2.stdout)
    assert json.loads(again.read_text()) == data


def test_bench_from_json_refuses_other_files_by_name(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something-else/1"}')
    r = run_command(cli_command("bench", "--from-json", str(other)), timeout=60)
    assert r.returncode == 2 and "--from-json" in r.stderr and "something-else/1" in r.stderr
    other.write_text("not json")
    r = run_command(cli_command("bench", "--from-json", str(other)), timeout=60)
    assert r.returncode == 2 and "is not JSON" in r.stderr


@pytest.mark.timeout(240)
def test_bench_three_stages_two_by_two(tmp_path):
    out = tmp_path / "bench.json"
    r = run_command(
        cli_command(
            "bench", "--preset", "2a2f", "--stages", "3", "--contenders", "stepmesh,protocol,ucxx",
            "--progress", "blocking", "--no-need-event", *QUICK, "--json", str(out),
        ),
        timeout=200,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["workload"]["workers"] == 2 and data["workload"]["servers"] == 2
    assert data["options"]["stages"] == 3
    assert data["options"]["need_event"] is False and "need_event=False" in r.stdout
    assert set(data["trace_breakdown_us"]) == {"server 0", "server 1"}
    assert data["contenders"]["protocol"]["stats"]["samples"] == 40  # one pair's messages, rendezvous both ways


@pytest.mark.timeout(240)
def test_bench_written_answers_in_stepmesh_and_its_protocol(tmp_path):
    """STEPMESH_ONE_SIDED=all (host answers written too, as on a GPU device ones are): stepmesh and the protocol
    contender both put the answer and send the response header after the flush (the protocol contender checks
    what its worker received); the run records the level."""
    out = tmp_path / "bench.json"
    r = run_command(
        cli_command("bench", "--preset", "stepmesh-1x1", "--contenders", "stepmesh,protocol", *QUICK,
                    "--json", str(out)),
        timeout=200, env={"STEPMESH_ONE_SIDED": "all"},
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["environment"]["one_sided"] == "all" and "one-sided all" in r.stdout
    assert data["contenders"]["protocol"]["stats"]["samples"] == 40


def test_bench_checks_for_matplotlib_before_measuring(tmp_path):
    import importlib.util
    import time

    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here: the check has nothing to refuse")
    t0 = time.monotonic()
    r = run_command(cli_command("bench", "--preset", "small", "--plot", str(tmp_path / "cdf.png")), timeout=60)
    assert r.returncode == 2 and "needs matplotlib" in r.stderr, r.stderr
    assert "measuring" not in r.stderr and time.monotonic() - t0 < 20  # refused before any contender started


def test_bench_rejects_bad_options_by_name():
    r = run_command(cli_command("bench", "--push", "64xq:bfloat16"), timeout=60)
    assert r.returncode == 2 and "--push" in r.stderr and "64xq" in r.stderr
    r = run_command(cli_command("bench", "--contenders", "ucxx"), timeout=60)
    assert r.returncode == 2 and "--contenders" in r.stderr


@pytest.mark.timeout(240)
def test_bench_floor_runs_on_the_transports_the_mesh_is_narrowed_to(tmp_path):
    """STEPMESH_TRANSPORTS narrows the ucxx floor as it narrows stepmesh's data workers (same bytes, same wire).

    Both take their UCX options from the data wire's and the configuration's; the result records them.
    """
    out = tmp_path / "bench.json"
    r = run_command(
        cli_command(
            "bench", "--preset", "small", "--contenders", "stepmesh,ucxx", "--progress", "blocking", *QUICK,
            "--json", str(out),
        ),
        timeout=200,
        env={"STEPMESH_TRANSPORTS": "tcp", "STEPMESH_NET_DEVICES": "lo"},  # loopback only
    )
    assert r.returncode == 0, r.stderr
    assert "TLS=tcp, NET_DEVICES=lo" in r.stdout, r.stdout
    data = json.loads(out.read_text())
    assert data["ucx_options"]["TLS"] == "tcp" and data["ucx_options"]["NET_DEVICES"] == "lo"
    for name in ("stepmesh", "ucxx"):
        assert data["contenders"][name]["stats"]["samples"] == 40
