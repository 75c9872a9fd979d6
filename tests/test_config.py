"""stepmesh.Config: resolution order, parsing of every variable, every error path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import stepmesh
from stepmesh import Config, ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# Every variable Config reads, and the field it fills.
VARIABLES = {
    "DMLC_ROLE": "role",
    "DMLC_NUM_WORKER": "num_workers",
    "DMLC_NUM_SERVER": "num_servers",
    "DMLC_GROUP_SIZE": "group_size",
    "DMLC_NODE_RANK": "node_rank",
    "DMLC_RANK_OFFSET": "rank_offset",
    "DMLC_PS_ROOT_URI": "root_uri",
    "DMLC_PS_ROOT_PORT": "root_port",
    "DMLC_NODE_HOST": "node_host",
    "DMLC_INTERFACE": "interface",
    "DMLC_ENABLE_RDMA": "enable_rdma",
    "STEPMESH_GPU": "gpu",
    "STEPMESH_BACKEND": "backend",
    "STEPMESH_BIND_CPU_CORE": "bind_cpu_core",
    "STEPMESH_CPU_START_OFFSET": "cpu_start_offset",
    "PS_VERBOSE": "verbose",
    "STEPMESH_TRANSPORTS": "transports",
    "STEPMESH_NET_DEVICES": "net_devices",
    "STEPMESH_PROGRESS": "progress",
    "STEPMESH_DEVICE_LANE": "device_lane",
    "STEPMESH_TOPOLOGY": "topology",
    "STEPMESH_MEMORY_HINTS": "memory_hints",
    "STEPMESH_ONE_SIDED": "one_sided",
    "STEPMESH_AUTH_TOKEN": "auth_token",
    "STEPMESH_INIT_TIMEOUT_MS": "init_timeout_ms",
    "STEPMESH_BARRIER_TIMEOUT_MS": "barrier_timeout_ms",
    "STEPMESH_STOP_TIMEOUT_MS": "stop_timeout_ms",
    "STEPMESH_HEARTBEAT_INTERVAL_MS": "heartbeat_interval_ms",
    "STEPMESH_HEARTBEAT_TIMEOUT_MS": "heartbeat_timeout_ms",
}

DEFAULTS = {
    "role": None,
    "num_workers": 1,
    "num_servers": 1,
    "group_size": 1,
    "node_rank": None,
    "rank_offset": 0,
    "root_uri": "127.0.0.1",
    "root_port": None,
    "node_host": None,
    "interface": None,
    "enable_rdma": None,
    "gpu": 0,
    "backend": None,
    "bind_cpu_core": False,
    "cpu_start_offset": 0,
    "verbose": 0,
    "transports": None,
    "net_devices": None,
    "device_lane": None,
    "topology": "group",
    "memory_hints": "all",
    "one_sided": "device",
    "auth_token": None,
    "init_timeout_ms": 60_000,
    "barrier_timeout_ms": 60_000,
    "stop_timeout_ms": 60_000,
    "heartbeat_interval_ms": 500,
    "heartbeat_timeout_ms": 2_000,
}


def cfg(env: dict[str, str] | None = None, **overrides: Any) -> Config:
    return Config.from_env(environ={} if env is None else env, **overrides)


def raises_naming(variable: str, *fragments: str, env=None, **overrides: Any) -> str:
    """Resolve; assert a ConfigError whose message names ``variable`` and every fragment."""
    with pytest.raises(ConfigError) as info:
        cfg(env, **overrides)
    message = str(info.value)
    assert variable in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------ the table
def test_every_field_has_exactly_the_expected_variable():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert {Config.variable(name): name for name in fields} == VARIABLES
    with pytest.raises(KeyError):
        Config.variable("no_such_field")


def test_the_configuration_reference_documents_every_variable():
    text = DOCS.read_text()
    missing = [v for v in [*VARIABLES, "STEPMESH_BAKCEND"] if f"`{v}`" not in text]
    assert not missing, f"docs/configuration.md does not document {missing}"


# ------------------------------------------------------------------ defaults
def test_defaults_with_an_empty_environment():
    c = cfg()
    actual = {name: getattr(c, name) for name in DEFAULTS}
    assert actual == DEFAULTS
    assert c.progress in ("polling", "blocking")


@pytest.mark.parametrize(
    "cores, expected",
    [(1, "blocking"), (2, "blocking"), (7, "blocking"), (8, "polling"), (64, "polling")],
)
def test_default_progress_depends_on_the_cores_available(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cfg().progress == expected
    # An explicit choice is kept whatever the core count.
    assert cfg({"STEPMESH_PROGRESS": "thread"}).progress == "thread"


def test_from_env_without_environ_reads_os_environ(monkeypatch):
    for var in [*VARIABLES, "STEPMESH_BAKCEND"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DMLC_NUM_WORKER", "3")
    monkeypatch.setenv("STEPMESH_TOPOLOGY", "full")
    c = Config.from_env()
    assert (c.num_workers, c.topology) == (3, "full")
    assert c.num_servers == 1


def test_unrelated_variables_are_ignored():
    assert cfg({"DMLC_FOO": "x", "STEPMESH_NOPE": "y", "UCX_TLS": "tcp"}) == cfg()


# ------------------------------------------------------------- resolution order
@pytest.mark.parametrize(
    "field_name, env_raw, env_value, override",
    [
        ("num_workers", "4", 4, 7),
        ("role", "server", "server", "worker"),
        ("root_uri", "10.0.0.1", "10.0.0.1", "10.0.0.2"),
        ("enable_rdma", "0", False, True),
        ("topology", "full", "full", "group"),
        ("heartbeat_interval_ms", "100", 100, 250),
        ("auth_token", "from-env", "from-env", "from-arg"),
    ],
)
def test_resolution_order_override_then_environ_then_default(field_name, env_raw, env_value, override):
    var = Config.variable(field_name)
    assert getattr(cfg(), field_name) == DEFAULTS[field_name]
    assert getattr(cfg({var: env_raw}), field_name) == env_value
    assert getattr(cfg({var: env_raw}, **{field_name: override}), field_name) == override
    assert getattr(cfg(**{field_name: override}), field_name) == override


def test_an_override_means_the_variable_is_not_even_parsed():
    c = cfg({"DMLC_NUM_WORKER": "not-a-number"}, num_workers=2)
    assert c.num_workers == 2


def test_overrides_are_validated_too():
    raises_naming("DMLC_NUM_WORKER", "an integer >= 1", num_workers=0)
    raises_naming("DMLC_NUM_WORKER", "an integer", num_workers="2")  # overrides are typed values
    raises_naming("DMLC_NUM_WORKER", "an integer", num_workers=True)
    raises_naming("DMLC_PS_ROOT_URI", "host name or IP address", root_uri=None)
    raises_naming("DMLC_ROLE", "scheduler, server, worker", role="joint")
    raises_naming("STEPMESH_TRANSPORTS", "comma-separated", transports=("tcp", ""))


def test_direct_construction_validates_like_from_env():
    with pytest.raises(ConfigError, match="STEPMESH_TOPOLOGY"):
        Config(topology="ring")
    assert Config(num_workers=3).num_workers == 3


def test_unknown_override_field_raises_config_error():
    with pytest.raises(ConfigError) as info:
        cfg(num_worker=2)  # sic: the field is num_workers
    message = str(info.value)
    assert "num_worker" in message and "unknown" in message
    assert "num_workers" in message  # the known fields are listed


def test_config_error_is_a_stepmesh_error_and_a_value_error():
    with pytest.raises(stepmesh.StepMeshError):
        cfg({"DMLC_NUM_WORKER": "x"})
    with pytest.raises(ValueError):
        cfg({"DMLC_NUM_WORKER": "x"})


# ----------------------------------------------------------- parsing, per variable
@pytest.mark.parametrize(
    "env, field_name, expected",
    [
        ({"DMLC_ROLE": "worker"}, "role", "worker"),
        ({"DMLC_ROLE": "server"}, "role", "server"),
        ({"DMLC_ROLE": " Scheduler "}, "role", "scheduler"),
        ({"DMLC_NUM_WORKER": "2"}, "num_workers", 2),
        ({"DMLC_NUM_WORKER": " 16 "}, "num_workers", 16),
        ({"DMLC_NUM_SERVER": "3"}, "num_servers", 3),
        ({"DMLC_GROUP_SIZE": "8"}, "group_size", 8),
        ({"DMLC_NODE_RANK": "0"}, "node_rank", 0),
        ({"DMLC_NODE_RANK": "5"}, "node_rank", 5),
        ({"DMLC_RANK_OFFSET": "4"}, "rank_offset", 4),
        ({"DMLC_PS_ROOT_URI": "sched.example"}, "root_uri", "sched.example"),
        ({"DMLC_PS_ROOT_URI": " 10.1.2.3 "}, "root_uri", "10.1.2.3"),
        ({"DMLC_PS_ROOT_PORT": "8123"}, "root_port", 8123),
        ({"DMLC_PS_ROOT_PORT": "65535"}, "root_port", 65535),
        ({"DMLC_PS_ROOT_PORT": "0", "DMLC_ROLE": "scheduler"}, "root_port", 0),
        ({"DMLC_PS_ROOT_PORT": "0"}, "root_port", 0),  # role unknown yet: allowed
        ({"DMLC_NODE_HOST": "192.168.1.10"}, "node_host", "192.168.1.10"),
        ({"DMLC_INTERFACE": "brainpf_bond0"}, "interface", "brainpf_bond0"),
        ({"DMLC_INTERFACE": "auto"}, "interface", "auto"),
        ({"DMLC_ENABLE_RDMA": "1"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "ibverbs"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "IBVERBS"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "verbs"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "rdma"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "true"}, "enable_rdma", True),
        ({"DMLC_ENABLE_RDMA": "0"}, "enable_rdma", False),
        ({"DMLC_ENABLE_RDMA": "False"}, "enable_rdma", False),
        ({"DMLC_ENABLE_RDMA": "off"}, "enable_rdma", False),
        ({"DMLC_ENABLE_RDMA": "zmq"}, "enable_rdma", False),  # StepMesh's TCP van
        ({"DMLC_ENABLE_RDMA": "ucx"}, "enable_rdma", None),  # StepMesh's UCX van: what UCX finds
        ({"STEPMESH_GPU": "3"}, "gpu", 3),
        ({"STEPMESH_BACKEND": "cuda"}, "backend", "cuda"),
        ({"STEPMESH_BACKEND": "GPU"}, "backend", "cuda"),  # StepMesh's names
        ({"STEPMESH_BACKEND": "CPU"}, "backend", "cpu"),
        ({"STEPMESH_BACKEND": "ROCM"}, "backend", "rocm"),
        ({"STEPMESH_BAKCEND": "GPU"}, "backend", "cuda"),  # StepMesh's misspelling
        ({"STEPMESH_BAKCEND": "cpu"}, "backend", "cpu"),
        ({"STEPMESH_BACKEND": "cpu", "STEPMESH_BAKCEND": "GPU"}, "backend", "cpu"),
        ({"STEPMESH_BIND_CPU_CORE": "1"}, "bind_cpu_core", True),
        ({"STEPMESH_BIND_CPU_CORE": "yes"}, "bind_cpu_core", True),
        ({"STEPMESH_BIND_CPU_CORE": "0"}, "bind_cpu_core", False),
        ({"STEPMESH_BIND_CPU_CORE": "FALSE"}, "bind_cpu_core", False),
        ({"STEPMESH_DEVICE_LANE": "0"}, "device_lane", False),
        ({"STEPMESH_DEVICE_LANE": "on"}, "device_lane", True),
        ({"STEPMESH_CPU_START_OFFSET": "10"}, "cpu_start_offset", 10),
        ({"PS_VERBOSE": "0"}, "verbose", 0),
        ({"PS_VERBOSE": "1"}, "verbose", 1),
        ({"PS_VERBOSE": "2"}, "verbose", 2),
        ({"PS_VERBOSE": "3"}, "verbose", 3),  # ps-lite's higher levels: every message, as 2
        ({"STEPMESH_TRANSPORTS": "tcp"}, "transports", ("tcp",)),
        ({"STEPMESH_TRANSPORTS": "rc, cuda_copy,cuda_ipc ,"}, "transports", ("rc", "cuda_copy", "cuda_ipc")),
        ({"STEPMESH_TRANSPORTS": "^tcp"}, "transports", ("^tcp",)),
        ({"STEPMESH_NET_DEVICES": "mlx5_0:1,mlx5_1:1"}, "net_devices", "mlx5_0:1,mlx5_1:1"),
        ({"STEPMESH_PROGRESS": "polling"}, "progress", "polling"),
        ({"STEPMESH_PROGRESS": "blocking"}, "progress", "blocking"),
        ({"STEPMESH_PROGRESS": "thread"}, "progress", "thread"),
        ({"STEPMESH_TOPOLOGY": "group"}, "topology", "group"),
        ({"STEPMESH_TOPOLOGY": "full"}, "topology", "full"),
        ({"STEPMESH_MEMORY_HINTS": "off"}, "memory_hints", "off"),
        ({"STEPMESH_MEMORY_HINTS": "all"}, "memory_hints", "all"),
        ({"STEPMESH_ONE_SIDED": "off"}, "one_sided", "off"),
        ({"STEPMESH_ONE_SIDED": "all"}, "one_sided", "all"),
        ({"STEPMESH_AUTH_TOKEN": "s3cret"}, "auth_token", "s3cret"),
        ({"STEPMESH_INIT_TIMEOUT_MS": "1"}, "init_timeout_ms", 1),
        ({"STEPMESH_INIT_TIMEOUT_MS": "120000"}, "init_timeout_ms", 120_000),
        ({"STEPMESH_BARRIER_TIMEOUT_MS": "5000"}, "barrier_timeout_ms", 5_000),
        ({"STEPMESH_STOP_TIMEOUT_MS": "7000"}, "stop_timeout_ms", 7_000),
        ({"STEPMESH_HEARTBEAT_INTERVAL_MS": "10"}, "heartbeat_interval_ms", 10),
        ({"STEPMESH_HEARTBEAT_TIMEOUT_MS": "501"}, "heartbeat_timeout_ms", 501),
        (
            {"STEPMESH_HEARTBEAT_INTERVAL_MS": "2000", "STEPMESH_HEARTBEAT_TIMEOUT_MS": "10000"},
            "heartbeat_interval_ms",
            2_000,
        ),
    ],
)
def test_each_variable_is_parsed(env, field_name, expected):
    assert getattr(cfg(env), field_name) == expected


def test_every_variable_is_covered_by_the_parsing_table():
    table = test_each_variable_is_parsed.pytestmark[0].args[1]
    covered = {var for env, _, _ in table for var in env}
    assert covered >= set(VARIABLES) | {"STEPMESH_BAKCEND"}


# ---------------------------------------------------------------- error paths
INT = "an integer"
ROLES = "scheduler, server, worker"
BOOL = "1, 0, true, false"


@pytest.mark.parametrize(
    "env, variable, accepted",
    [
        ({"DMLC_ROLE": "joint"}, "DMLC_ROLE", ROLES),
        ({"DMLC_ROLE": "master"}, "DMLC_ROLE", ROLES),
        ({"DMLC_ROLE": ""}, "DMLC_ROLE", ROLES),
        ({"DMLC_NUM_WORKER": "two"}, "DMLC_NUM_WORKER", INT),
        ({"DMLC_NUM_WORKER": "1.5"}, "DMLC_NUM_WORKER", INT),
        ({"DMLC_NUM_WORKER": "0x10"}, "DMLC_NUM_WORKER", INT),
        ({"DMLC_NUM_WORKER": ""}, "DMLC_NUM_WORKER", INT),
        ({"DMLC_NUM_WORKER": "0"}, "DMLC_NUM_WORKER", "an integer >= 1"),
        ({"DMLC_NUM_WORKER": "-2"}, "DMLC_NUM_WORKER", "an integer >= 1"),
        ({"DMLC_NUM_SERVER": "x"}, "DMLC_NUM_SERVER", INT),
        ({"DMLC_NUM_SERVER": "0"}, "DMLC_NUM_SERVER", "an integer >= 1"),
        ({"DMLC_GROUP_SIZE": "eight"}, "DMLC_GROUP_SIZE", INT),
        ({"DMLC_GROUP_SIZE": "0"}, "DMLC_GROUP_SIZE", "an integer >= 1"),
        ({"DMLC_NODE_RANK": "first"}, "DMLC_NODE_RANK", INT),
        ({"DMLC_NODE_RANK": "-1"}, "DMLC_NODE_RANK", "an integer >= 0"),
        ({"DMLC_RANK_OFFSET": "x"}, "DMLC_RANK_OFFSET", INT),
        ({"DMLC_RANK_OFFSET": "-1", "DMLC_ROLE": "worker", "DMLC_PS_ROOT_PORT": "9"}, "DMLC_RANK_OFFSET", "an instance group"),
        ({"DMLC_RANK_OFFSET": "-5000"}, "DMLC_RANK_OFFSET", "an integer >= -4095"),
        ({"DMLC_PS_ROOT_URI": ""}, "DMLC_PS_ROOT_URI", "a host name or IP address"),
        ({"DMLC_PS_ROOT_URI": "   "}, "DMLC_PS_ROOT_URI", "a host name or IP address"),
        ({"DMLC_PS_ROOT_PORT": "http"}, "DMLC_PS_ROOT_PORT", INT),
        ({"DMLC_PS_ROOT_PORT": "-1"}, "DMLC_PS_ROOT_PORT", "an integer >= 0 and <= 65535"),
        ({"DMLC_PS_ROOT_PORT": "65536"}, "DMLC_PS_ROOT_PORT", "an integer >= 0 and <= 65535"),
        (
            {"DMLC_PS_ROOT_PORT": "0", "DMLC_ROLE": "worker"},
            "DMLC_PS_ROOT_PORT",
            "a port from 1 to 65535 (0 is only for the scheduler)",
        ),
        (
            {"DMLC_PS_ROOT_PORT": "0", "DMLC_ROLE": "server"},
            "DMLC_PS_ROOT_PORT",
            "a port from 1 to 65535",
        ),
        ({"DMLC_ENABLE_RDMA": "maybe"}, "DMLC_ENABLE_RDMA", BOOL + ", ibverbs, zmq, ucx"),
        ({"DMLC_ENABLE_RDMA": "fabric"}, "DMLC_ENABLE_RDMA", BOOL + ", ibverbs, zmq, ucx"),
        ({"STEPMESH_GPU": "cuda:0"}, "STEPMESH_GPU", INT),
        ({"STEPMESH_GPU": "-1"}, "STEPMESH_GPU", "an integer >= 0"),
        ({"STEPMESH_BIND_CPU_CORE": "maybe"}, "STEPMESH_BIND_CPU_CORE", BOOL),
        ({"STEPMESH_BIND_CPU_CORE": "2"}, "STEPMESH_BIND_CPU_CORE", BOOL),
        ({"STEPMESH_DEVICE_LANE": "auto"}, "STEPMESH_DEVICE_LANE", BOOL),
        ({"STEPMESH_CPU_START_OFFSET": "x"}, "STEPMESH_CPU_START_OFFSET", INT),
        ({"STEPMESH_CPU_START_OFFSET": "-1"}, "STEPMESH_CPU_START_OFFSET", "an integer >= 0"),
        ({"PS_VERBOSE": "-1"}, "PS_VERBOSE", "an integer >= 0"),
        ({"PS_VERBOSE": "debug"}, "PS_VERBOSE", INT),
        ({"STEPMESH_TRANSPORTS": ""}, "STEPMESH_TRANSPORTS", "a comma-separated list of UCX transports"),
        ({"STEPMESH_TRANSPORTS": " , ,"}, "STEPMESH_TRANSPORTS", "a comma-separated list of UCX transports"),
        ({"STEPMESH_PROGRESS": "fast"}, "STEPMESH_PROGRESS", "blocking, polling, thread"),
        ({"STEPMESH_PROGRESS": ""}, "STEPMESH_PROGRESS", "blocking, polling, thread"),
        ({"STEPMESH_TOPOLOGY": "ring"}, "STEPMESH_TOPOLOGY", "group, full"),
        ({"STEPMESH_MEMORY_HINTS": "cuda"}, "STEPMESH_MEMORY_HINTS", "off, host, all"),
        ({"STEPMESH_ONE_SIDED": "on"}, "STEPMESH_ONE_SIDED", "off, device, all"),
        ({"STEPMESH_AUTH_TOKEN": ""}, "STEPMESH_AUTH_TOKEN", "a non-empty secret"),
        ({"STEPMESH_INIT_TIMEOUT_MS": "soon"}, "STEPMESH_INIT_TIMEOUT_MS", INT),
        ({"STEPMESH_INIT_TIMEOUT_MS": "0"}, "STEPMESH_INIT_TIMEOUT_MS", "an integer >= 1"),
        ({"STEPMESH_BARRIER_TIMEOUT_MS": "1s"}, "STEPMESH_BARRIER_TIMEOUT_MS", INT),
        ({"STEPMESH_BARRIER_TIMEOUT_MS": "0"}, "STEPMESH_BARRIER_TIMEOUT_MS", "an integer >= 1"),
        ({"STEPMESH_STOP_TIMEOUT_MS": "x"}, "STEPMESH_STOP_TIMEOUT_MS", INT),
        ({"STEPMESH_STOP_TIMEOUT_MS": "-5"}, "STEPMESH_STOP_TIMEOUT_MS", "an integer >= 1"),
        ({"STEPMESH_HEARTBEAT_INTERVAL_MS": "x"}, "STEPMESH_HEARTBEAT_INTERVAL_MS", INT),
        ({"STEPMESH_HEARTBEAT_INTERVAL_MS": "9"}, "STEPMESH_HEARTBEAT_INTERVAL_MS", "an integer >= 10"),
        ({"STEPMESH_HEARTBEAT_TIMEOUT_MS": "x"}, "STEPMESH_HEARTBEAT_TIMEOUT_MS", INT),
        ({"STEPMESH_HEARTBEAT_TIMEOUT_MS": "9"}, "STEPMESH_HEARTBEAT_TIMEOUT_MS", "an integer >= 10"),
        (
            {"STEPMESH_HEARTBEAT_TIMEOUT_MS": "500"},  # equal to the default interval
            "STEPMESH_HEARTBEAT_TIMEOUT_MS",
            "more than heartbeat_interval_ms (500)",
        ),
        (
            {"STEPMESH_HEARTBEAT_INTERVAL_MS": "5000"},  # above the default timeout
            "STEPMESH_HEARTBEAT_TIMEOUT_MS",
            "more than heartbeat_interval_ms (5000)",
        ),
    ],
)
def test_each_bad_value_names_the_variable_and_the_accepted_values(env, variable, accepted):
    message = raises_naming(variable, accepted, env=env)
    bad = env[variable].strip() if variable in env else None
    # The offending value is quoted back (as parsed, for range errors). A list of
    # transports is quoted after splitting, so " , ," shows as "()".
    if bad and variable != "STEPMESH_TRANSPORTS":
        assert bad in message, message


def test_every_validated_variable_has_an_error_case():
    table = test_each_bad_value_names_the_variable_and_the_accepted_values.pytestmark[0].args[1]
    named = {variable for _, variable, _ in table}
    free_text = {"DMLC_NODE_HOST", "DMLC_INTERFACE", "STEPMESH_NET_DEVICES", "STEPMESH_BACKEND"}
    assert named == set(VARIABLES) - free_text


def test_the_scheduler_may_ask_for_port_zero_but_a_worker_made_from_it_may_not():
    c = cfg({"DMLC_PS_ROOT_PORT": "0"})
    assert c.replace(role="scheduler").root_port == 0
    with pytest.raises(ConfigError, match="DMLC_PS_ROOT_PORT"):
        c.replace(role="worker")


# ---------------------------------------------------------------- the token
def test_the_auth_token_is_never_shown():
    secret = "tok-7f3a9c1e"
    for c in (cfg({"STEPMESH_AUTH_TOKEN": secret}), cfg(auth_token=secret)):
        assert c.auth_token == secret
        assert secret not in repr(c)
        assert secret not in str(c)
        assert "auth_token" not in repr(c)
    # Nor in the message of an unrelated error.
    with pytest.raises(ConfigError) as info:
        cfg({"STEPMESH_AUTH_TOKEN": secret, "DMLC_NUM_WORKER": "0"})
    assert secret not in str(info.value)


# ------------------------------------------------------------ derived values
@pytest.mark.parametrize(
    "gpu, offset, group", [(0, 0, 0), (3, 0, 3), (0, 4, 4), (2, 4, 6), (7, 8, 15)]
)
def test_group_is_gpu_plus_rank_offset(gpu, offset, group):
    c = cfg({"STEPMESH_GPU": str(gpu), "DMLC_RANK_OFFSET": str(offset)})
    assert c.group == group


@pytest.mark.parametrize("workers, servers, groups, expected", [(1, 1, 1, 2), (2, 3, 1, 5), (2, 2, 8, 32)])
def test_expected_nodes_counts_every_group(workers, servers, groups, expected):
    c = cfg({"DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers), "DMLC_GROUP_SIZE": str(groups)})
    assert c.expected_nodes == expected


_VERBS = ("rc", "rc_x", "dc", "dc_x", "ud", "ud_x", "ib")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {}),
        ({"DMLC_ENABLE_RDMA": "1"}, {}),
        ({"DMLC_ENABLE_RDMA": "ibverbs"}, {}),
        ({"STEPMESH_TRANSPORTS": "tcp"}, {"TLS": "tcp"}),
        ({"STEPMESH_TRANSPORTS": " rc , cuda_copy,cuda_ipc"}, {"TLS": "rc,cuda_copy,cuda_ipc"}),
        ({"STEPMESH_NET_DEVICES": "mlx5_0:1"}, {"NET_DEVICES": "mlx5_0:1"}),
        (
            {"STEPMESH_TRANSPORTS": "tcp,sm", "STEPMESH_NET_DEVICES": "eth0"},
            {"TLS": "tcp,sm", "NET_DEVICES": "eth0"},
        ),
    ],
)
def test_ucx_options_mapping(env, expected):
    assert cfg(env).ucx_options() == expected


@pytest.mark.parametrize("raw", ["0", "false", "off", "no"])
def test_rdma_disabled_excludes_every_verbs_transport(raw):
    opts = cfg({"DMLC_ENABLE_RDMA": raw}).ucx_options()
    tls = opts["TLS"]
    assert tls.startswith("^"), tls  # an exclusion list: everything else stays available
    excluded = set(tls[1:].split(","))
    assert set(_VERBS) <= excluded, tls
    assert not excluded & {"tcp", "posix", "sysv", "cma", "cuda_copy", "cuda_ipc", "sm", "shm"}


def test_ucx_options_have_no_ucx_prefix():
    opts = cfg({"STEPMESH_TRANSPORTS": "tcp", "STEPMESH_NET_DEVICES": "lo"}).ucx_options()
    assert all(not k.startswith("UCX_") for k in opts)


# ---------------------------------------------------------------- frozen
def test_config_is_frozen_and_replace_revalidates():
    c = cfg({"DMLC_NUM_WORKER": "2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.transports = ("tcp",)  # type: ignore[misc]
    d = c.replace(num_workers=3)
    assert (c.num_workers, d.num_workers) == (2, 3)
    with pytest.raises(ConfigError, match="DMLC_NUM_WORKER"):
        c.replace(num_workers=0)


def test_equal_configs_are_equal_and_hashable():
    a = cfg({"STEPMESH_TRANSPORTS": "tcp,sm", "STEPMESH_PROGRESS": "blocking"})
    b = cfg(transports="tcp,sm", progress="blocking")
    assert a == b and hash(a) == hash(b)
    assert isinstance(a.transports, tuple)


def test_transports_given_as_a_list_are_normalised_to_a_tuple():
    c = cfg(transports=["tcp", "sm"])
    assert c.transports == ("tcp", "sm")
    hash(c)


@pytest.mark.parametrize("field_name", ["enable_rdma", "bind_cpu_core"])
def test_boolean_overrides_must_be_booleans(field_name):
    # "0" is a truthy string: accepted silently, DMLC_ENABLE_RDMA="0" given this
    # way would not exclude RDMA in ucx_options().
    with pytest.raises(ConfigError, match=Config.variable(field_name)):
        cfg(**{field_name: "0"})


# ------------------------------------------------------- import has no effects
def test_importing_stepmesh_leaves_os_environ_alone():
    code = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import stepmesh\n"
        "stepmesh.Config.from_env()\n"
        "after = dict(os.environ)\n"
        "diff = sorted(set(before.items()) ^ set(after.items()))\n"
        "print('DIFF', diff)\n"
        "print('UCXX', sorted(m for m in sys.modules if m.split('.')[0] == 'ucxx'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCX_", "DMLC_", "STEPMESH_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "DIFF []" in out.stdout.splitlines(), out.stdout
    # ucxx writes UCX_* defaults into os.environ when imported: it must stay lazy.
    assert "UCXX []" in out.stdout.splitlines(), out.stdout


# ------------------------------------------------------------ property tests
def _python_int(text: str) -> bool:
    try:
        int(text.strip(), 10)
    except ValueError:
        return False
    return True


@given(
    value=st.integers(min_value=1, max_value=4094),  # plus one server: at most 4095 nodes
    zeros=st.integers(min_value=0, max_value=3),
    sign=st.sampled_from(["", "+"]),
    pad=st.sampled_from(["", " ", "\t", "  "]),
)
def test_num_worker_round_trips(value, zeros, sign, pad):
    """Any in-range count parses, whatever its padding, sign or leading zeros."""
    raw = f"{pad}{sign}{'0' * zeros}{value}{pad}"
    c = cfg({"DMLC_NUM_WORKER": raw})
    assert c.num_workers == value
    assert cfg({"DMLC_NUM_WORKER": str(c.num_workers)}) == c


@given(text=st.text())
@example(text="")
@example(text="1.0")
@example(text="1e3")
@example(text="0x10")
@example(text="one")
@example(text="- 1")
@example(text="1 2")
def test_num_worker_that_is_not_an_integer_is_refused_by_name(text):
    assume(not _python_int(text))
    with pytest.raises(ConfigError) as info:
        cfg({"DMLC_NUM_WORKER": text})
    message = str(info.value)
    assert "DMLC_NUM_WORKER" in message and "an integer" in message


def test_the_property_filter_is_not_vacuous():
    # Guard for the test above: the filter keeps ordinary junk and drops integers.
    assert not _python_int("abc") and not _python_int("1.5") and not _python_int("")
    assert _python_int(" 7 ") and _python_int("+3")


@pytest.mark.parametrize(
    "env",
    [{"DMLC_NUM_WORKER": "4096"}, {"DMLC_NUM_WORKER": "3000", "DMLC_NUM_SERVER": "1096"},
     {"DMLC_NUM_WORKER": "2", "DMLC_GROUP_SIZE": "2048"}],
)
def test_mesh_larger_than_the_tag_space_is_refused(env):
    with pytest.raises(ConfigError, match="4095"):
        cfg(env)


@pytest.mark.parametrize("bad", ["foo bar", "", "c++", 3])
def test_backend_must_be_a_name(bad):
    with pytest.raises(ConfigError, match="STEPMESH_BACKEND"):
        cfg(backend=bad)


def test_to_env_is_what_from_env_reads_back():
    c = Config(role="worker", num_workers=2, num_servers=3, group_size=4, gpu=1, rank_offset=2, root_port=4321,
               transports=("tcp", "posix"), bind_cpu_core=True, auth_token="s3cret", progress="polling")
    env = c.to_env()
    assert env["DMLC_ROLE"] == "worker" and env["STEPMESH_TRANSPORTS"] == "tcp,posix" and env["STEPMESH_BIND_CPU_CORE"] == "1"
    assert "DMLC_NODE_RANK" not in env  # unset stays unset
    assert Config.from_env(environ=env) == c


def test_the_device_lane_is_on_where_torch_sees_a_device_unless_set():
    import torch

    here = bool(torch.cuda.is_available())
    assert Config.from_env({}).lane_on() is here
    assert Config.from_env({"STEPMESH_BACKEND": "cpu"}).lane_on() is False
    assert Config.from_env({"STEPMESH_DEVICE_LANE": "1", "STEPMESH_BACKEND": "cpu"}).lane_on() is True
    assert Config.from_env({"STEPMESH_DEVICE_LANE": "0"}).lane_on() is False
