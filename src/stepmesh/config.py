"""One frozen configuration, resolved once: explicit argument, then environment, then default.

This is the only module that reads the environment. StepMesh's variables keep
their meaning (see ``docs/configuration.md``); new ones are ``STEPMESH_*``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["Config", "ROLES", "PROGRESS_MODES", "TOPOLOGIES", "MEMORY_HINTS", "ONE_SIDED"]

ROLES = ("scheduler", "server", "worker")
PROGRESS_MODES = ("blocking", "polling", "thread")
TOPOLOGIES = ("group", "full")
MEMORY_HINTS = ("off", "host", "all")
ONE_SIDED = ("off", "device", "all")
_TRUE = ("1", "true", "yes", "on", "y")
_FALSE = ("0", "false", "no", "off", "n", "")
_BACKEND_ALIASES = {"CPU": "cpu", "GPU": "cuda"}
# Node ids travel in 12 bits of every tag (see stepmesh.data.wire.make_tag).
_MAX_NODES = 4095
# On fewer cores than this, busy-polling progress starves the peers sharing them.
_POLLING_MIN_CORES = 8


def _env(name: str) -> dict[str, str]:
    return {"name": name}


@dataclass(frozen=True)
class Config:
    """Every setting of a node, validated on construction.

    Build it with :meth:`from_env` (explicit keyword arguments win over the
    environment, which wins over the defaults) or directly with keywords.

    Raises:
        ConfigError: a value is out of range or not one of the accepted values;
            the message names the variable and what it accepts.
    """

    role: str | None = field(default=None, metadata=_env("DMLC_ROLE"))
    num_workers: int = field(default=1, metadata=_env("DMLC_NUM_WORKER"))
    num_servers: int = field(default=1, metadata=_env("DMLC_NUM_SERVER"))
    group_size: int = field(default=1, metadata=_env("DMLC_GROUP_SIZE"))
    node_rank: int | None = field(default=None, metadata=_env("DMLC_NODE_RANK"))
    rank_offset: int = field(default=0, metadata=_env("DMLC_RANK_OFFSET"))
    root_uri: str = field(default="127.0.0.1", metadata=_env("DMLC_PS_ROOT_URI"))
    root_port: int | None = field(default=None, metadata=_env("DMLC_PS_ROOT_PORT"))
    node_host: str | None = field(default=None, metadata=_env("DMLC_NODE_HOST"))
    interface: str | None = field(default=None, metadata=_env("DMLC_INTERFACE"))
    enable_rdma: bool | None = field(default=None, metadata=_env("DMLC_ENABLE_RDMA"))
    gpu: int = field(default=0, metadata=_env("STEPMESH_GPU"))
    backend: str | None = field(default=None, metadata=_env("STEPMESH_BACKEND"))
    bind_cpu_core: bool = field(default=False, metadata=_env("STEPMESH_BIND_CPU_CORE"))
    cpu_start_offset: int = field(default=0, metadata=_env("STEPMESH_CPU_START_OFFSET"))
    verbose: int = field(default=0, metadata=_env("PS_VERBOSE"))
    transports: tuple[str, ...] | None = field(
        default=None, metadata=_env("STEPMESH_TRANSPORTS")
    )
    net_devices: str | None = field(default=None, metadata=_env("STEPMESH_NET_DEVICES"))
    progress: str | None = field(default=None, metadata=_env("STEPMESH_PROGRESS"))
    device_lane: bool | None = field(default=None, metadata=_env("STEPMESH_DEVICE_LANE"))
    topology: str = field(default="group", metadata=_env("STEPMESH_TOPOLOGY"))
    memory_hints: str = field(default="all", metadata=_env("STEPMESH_MEMORY_HINTS"))
    one_sided: str = field(default="device", metadata=_env("STEPMESH_ONE_SIDED"))
    auth_token: str | None = field(
        default=None, repr=False, metadata=_env("STEPMESH_AUTH_TOKEN")
    )
    init_timeout_ms: int = field(default=60_000, metadata=_env("STEPMESH_INIT_TIMEOUT_MS"))
    barrier_timeout_ms: int = field(
        default=60_000, metadata=_env("STEPMESH_BARRIER_TIMEOUT_MS")
    )
    stop_timeout_ms: int = field(default=60_000, metadata=_env("STEPMESH_STOP_TIMEOUT_MS"))
    heartbeat_interval_ms: int = field(
        default=500, metadata=_env("STEPMESH_HEARTBEAT_INTERVAL_MS")
    )
    heartbeat_timeout_ms: int = field(
        default=2_000, metadata=_env("STEPMESH_HEARTBEAT_TIMEOUT_MS")
    )

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.role is not None and self.role not in ROLES:
            _fail("role", self.role, f"one of {', '.join(ROLES)}")
        for name, low, high in (
            ("num_workers", 1, _MAX_NODES),
            ("num_servers", 1, _MAX_NODES),
            ("group_size", 1, _MAX_NODES),
            ("rank_offset", -_MAX_NODES, _MAX_NODES),
            ("gpu", 0, _MAX_NODES),
            ("cpu_start_offset", 0, None),
            ("init_timeout_ms", 1, None),
            ("barrier_timeout_ms", 1, None),
            ("stop_timeout_ms", 1, None),
            ("heartbeat_interval_ms", 10, None),
            ("heartbeat_timeout_ms", 10, None),
        ):
            _check_int(name, getattr(self, name), low, high)
        if not 0 <= self.group < self.group_size and self.role not in (None, "scheduler"):
            _fail(
                "rank_offset",
                self.rank_offset,
                f"STEPMESH_GPU + DMLC_RANK_OFFSET = {self.group}: an instance group 0..{self.group_size - 1}"
                " (DMLC_GROUP_SIZE)",
            )
        if self.expected_nodes > _MAX_NODES:
            _fail(
                "group_size",
                self.group_size,
                f"(DMLC_NUM_WORKER + DMLC_NUM_SERVER) x DMLC_GROUP_SIZE <= {_MAX_NODES}",
            )
        if self.node_rank is not None:
            _check_int("node_rank", self.node_rank, 0, _MAX_NODES)
        for name in ("bind_cpu_core", "enable_rdma", "device_lane"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name != "bind_cpu_core" and value is None):
                _fail(name, value, "a bool (1, 0, true, false)")
        if self.root_port is not None:
            _check_int("root_port", self.root_port, 0, 65535)
            if self.root_port == 0 and self.role not in (None, "scheduler"):
                _fail("root_port", 0, "a port from 1 to 65535 (0 is only for the scheduler)")
        if isinstance(self.verbose, bool) or not isinstance(self.verbose, int) or self.verbose < 0:
            _fail("verbose", self.verbose, "an integer >= 0 (2 and above log every message)")
        if not self.root_uri or not isinstance(self.root_uri, str):
            _fail("root_uri", self.root_uri, "a host name or IP address")
        if self.backend is not None:
            if not isinstance(self.backend, str) or not self.backend.strip().replace("_", "").replace("-", "").isalnum():
                _fail("backend", self.backend, "CPU, GPU, cpu, cuda, rocm or the name of an installed backend")
            set_("backend", _BACKEND_ALIASES.get(self.backend, self.backend.strip().lower()))
        if self.progress is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            set_("progress", "polling" if cores >= _POLLING_MIN_CORES else "blocking")
        elif self.progress not in PROGRESS_MODES:
            _fail("progress", self.progress, f"one of {', '.join(PROGRESS_MODES)}")
        if self.topology not in TOPOLOGIES:
            _fail("topology", self.topology, f"one of {', '.join(TOPOLOGIES)}")
        if self.memory_hints not in MEMORY_HINTS:
            _fail("memory_hints", self.memory_hints, f"one of {', '.join(MEMORY_HINTS)}")
        if self.one_sided not in ONE_SIDED:
            _fail("one_sided", self.one_sided, f"one of {', '.join(ONE_SIDED)}")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            _fail(
                "heartbeat_timeout_ms",
                self.heartbeat_timeout_ms,
                f"more than heartbeat_interval_ms ({self.heartbeat_interval_ms})",
            )
        if self.transports is not None:
            if isinstance(self.transports, str):
                set_("transports", _split(self.transports))
            elif isinstance(self.transports, (list, tuple)):
                set_("transports", tuple(self.transports))
            if not self.transports or not all(isinstance(t, str) and t for t in self.transports):
                _fail("transports", self.transports, "a comma-separated list of UCX transports")
        if self.auth_token is not None and not self.auth_token:
            _fail("auth_token", "''", "a non-empty secret (or unset)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Resolve every field: keyword argument, then environment variable, then default.

        Args:
            environ: the environment to read; ``os.environ`` when None.
            **overrides: field values that win over the environment.

        Raises:
            ConfigError: an unknown keyword, an unparsable variable or an invalid value.
        """
        env = os.environ if environ is None else environ
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise ConfigError(
                f"unknown Config field(s): {', '.join(sorted(unknown))}; "
                f"known: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            var = f.metadata["name"]
            raw = env.get(var)
            if raw is None and name == "backend":
                raw = env.get("STEPMESH_BAKCEND")  # StepMesh's own spelling
                var = "STEPMESH_BAKCEND"
            if raw is None:
                continue
            values[name] = _parse(name, var, raw.strip())
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process this configuration (``from_env`` reads it back).

        Every field that is set, under its variable; what a launcher passes to
        the processes it starts (it never writes this process's environment).
        """
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = str(value)
            out[f.metadata["name"]] = text
        return out

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def group(self) -> int:
        """The instance group of this process: its local device index plus DMLC_RANK_OFFSET."""
        return self.gpu + self.rank_offset

    @property
    def expected_nodes(self) -> int:
        """How many workers and servers the scheduler waits for, all groups together."""
        return (self.num_workers + self.num_servers) * self.group_size

    def lane_on(self) -> bool:
        """Whether nodes open the device lane: ``device_lane`` when set, else whether torch sees a CUDA or ROCm
        device (never with the ``cpu`` backend)."""
        if self.device_lane is not None:
            return self.device_lane
        if self.backend == "cpu":
            return False
        import torch

        return bool(torch.cuda.is_available())

    def ucx_options(self) -> dict[str, str]:
        """UCX context options (without the ``UCX_`` prefix) implied by this config."""
        opts: dict[str, str] = {}
        if self.transports is not None:
            opts["TLS"] = ",".join(self.transports)
        elif self.enable_rdma is False:
            opts["TLS"] = "^rc,rc_x,dc,dc_x,ud,ud_x,ib"
        if self.net_devices is not None:
            opts["NET_DEVICES"] = self.net_devices
        elif self.interface and self.interface.lower() != "auto":
            opts["NET_DEVICES"] = self.interface
        return opts

    @staticmethod
    def variable(field_name: str) -> str:
        """The environment variable behind a field (for messages and docs)."""
        for f in dataclasses.fields(Config):
            if f.name == field_name:
                return str(f.metadata["name"])
        raise KeyError(field_name)


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"{Config.variable(name)} ({name}) = {value!r} is invalid: expected {accepted}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "an integer")
    if value < low or (high is not None and value > high):
        _fail(name, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def _split(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _parse_bool(name: str, var: str, raw: str) -> bool | None:
    low = raw.lower()
    if name == "enable_rdma" and low in ("zmq", "tcp"):
        return False  # StepMesh's TCP van: no RDMA
    if name == "enable_rdma" and low == "ucx":
        return None  # StepMesh's UCX van: whatever UCX finds, as by default here
    if low in _TRUE or (name == "enable_rdma" and low in ("ibverbs", "verbs", "rdma")):
        return True
    if low in _FALSE:
        return False
    extra = ", ibverbs, zmq, ucx" if name == "enable_rdma" else ""
    raise ConfigError(f"{var} = {raw!r} is invalid: expected one of 1, 0, true, false{extra}")


def _parse_int(name: str, var: str, raw: str) -> int:
    try:
        return int(raw, 10)
    except ValueError:
        raise ConfigError(f"{var} = {raw!r} is invalid: expected an integer") from None


_PARSERS: dict[str, Callable[[str, str, str], Any]] = {
    "num_workers": _parse_int,
    "num_servers": _parse_int,
    "group_size": _parse_int,
    "node_rank": _parse_int,
    "rank_offset": _parse_int,
    "root_port": _parse_int,
    "gpu": _parse_int,
    "cpu_start_offset": _parse_int,
    "verbose": _parse_int,
    "init_timeout_ms": _parse_int,
    "barrier_timeout_ms": _parse_int,
    "stop_timeout_ms": _parse_int,
    "heartbeat_interval_ms": _parse_int,
    "heartbeat_timeout_ms": _parse_int,
    "bind_cpu_core": _parse_bool,
    "enable_rdma": _parse_bool,
    "device_lane": _parse_bool,
}


def _parse(name: str, var: str, raw: str) -> Any:
    parser = _PARSERS.get(name)
    if parser is not None:
        return parser(name, var, raw)
    if name == "role":
        return raw.lower()
    return raw
