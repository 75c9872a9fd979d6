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
    for name in ("stepmesh", "protocol", "ucxx", "gloo"):
        assert any(line.startswith(name) for line in r.stdout.splitlines()), r.stdout
    # NIXL is measured where it is installed, and said to be "not run" where not: never silently dropped
    nixl = [line for line in r.stdout.splitlines() if line.startswith("nixl")]
    assert nixl and ("not run" in nixl[0] or nixl[0].split()[1].replace(".", "").isdigit()), r.stdout
    assert "round trip by stage" in r.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "stepmesh-bench/1"
    assert data["workload"]["name"] == "small"
    for name in ("stepmesh", "protocol", "ucxx", "gloo"):
        entry = data["contenders"][name]
        assert entry["stats"]["samples"] == 40 and len(entry["latencies_us"]) == 40
        assert 0 < entry["stats"]["p50_us"] <= entry["stats"]["p99_us"] <= entry["stats"]["max_us"]
    assert data["contenders"]["ucxx"]["stepmesh_p50_ratio"] > 0
    stages = data["trace_breakdown_us"]["server 0"]
    assert set(stages) >= {"request send", "request network", "response send"}

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


def test_bench_rejects_bad_options_by_name():
    r = run_command(cli_command("bench", "--push", "64xq:bfloat16"), timeout=60)
    assert r.returncode == 2 and "--push" in r.stderr and "64xq" in r.stderr
    r = run_command(cli_command("bench", "--contenders", "ucxx"), timeout=60)
    assert r.returncode == 2 and "--contenders" in r.stderr


@pytest.mark.timeout(240)
def test_bench_floor_runs_on_the_transports_the_mesh_is_narrowed_to(tmp_path):
    """STEPMESH_TRANSPORTS narrows the ucxx floor as it narrows stepmesh's data workers (same bytes, same wire).

    Both build their UCX options with ``node.data_ucx_options``; the result records them.
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
