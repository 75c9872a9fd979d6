"""What a benchmark run is: workloads, options, per-contender results, and the machine it ran on."""

from __future__ import annotations

import math
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "TensorSpec", "Workload", "PRESETS", "BenchOptions", "ContenderResult", "BenchResult", "Environment",
    "SCHEMA", "CONTENDERS",
]

SCHEMA = "stepmesh-bench/2"
#: Every contender, in the order they are shown.
CONTENDERS = ("stepmesh", "protocol", "ucxx", "perftest", "gloo", "nccl", "nixl")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name: "bfloat16", "float8_e4m3fn", "int32", ...

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    def make(self, device: str, fill: int = 0) -> Any:
        import torch

        dt = getattr(torch, self.dtype)
        base = torch.full(self.shape, fill % 100, dtype=torch.int32)
        return (base.to(dt) if dt.is_floating_point else base.to(dt)).to(device)


@dataclass(frozen=True)
class Workload:
    name: str
    push: tuple[TensorSpec, ...]  # every worker pushes these to every server
    pull: tuple[TensorSpec, ...]  # every server answers these to every worker
    workers: int = 1
    servers: int = 1

    @property
    def push_bytes(self) -> int:
        return sum(t.nbytes for t in self.push)

    @property
    def pull_bytes(self) -> int:
        return sum(t.nbytes for t in self.pull)


PRESETS: dict[str, Workload] = {
    "small": Workload("small", (TensorSpec((8192,), "uint8"),), (TensorSpec((8192,), "uint8"),)),
    "stepmesh-1x1": Workload(
        "stepmesh-1x1",
        (TensorSpec((64, 7168), "bfloat16"), TensorSpec((1,), "int32")),
        (TensorSpec((64, 7168), "bfloat16"), TensorSpec((1,), "int32")),
    ),
    "step3": Workload(
        "step3",
        (TensorSpec((128, 7168), "float8_e4m3fn"),),
        (TensorSpec((128, 7168), "bfloat16"),),
    ),
    "2a2f": Workload(
        "2a2f",
        (TensorSpec((128, 7168), "float8_e4m3fn"),),
        (TensorSpec((128, 7168), "bfloat16"),),
        workers=2,
        servers=2,
    ),
}


@dataclass(frozen=True)
class BenchOptions:
    workload: Workload
    stages: int = 1
    iters: int = 1000
    warmup: int = 100
    rounds: int = 10
    progress: str = "polling"
    device: str = "cpu"
    pin: bool = True
    contenders: tuple[str, ...] = ("stepmesh", "ucxx", "gloo")
    traces: bool = True
    round_timeout_s: float = 300.0
    need_event: bool = True  # push_pull's need_event (matters for device tensors only)


@dataclass
class ContenderResult:
    name: str
    latencies_us: list[float] = field(default_factory=list)
    seconds: float = 0.0
    ops: int = 0
    note: str = ""

    def stats(self) -> dict[str, float]:
        lat = sorted(self.latencies_us)
        if not lat:
            return {}

        def q(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))]

        return {
            "p50_us": statistics.median(lat),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "max_us": lat[-1],
            "mean_us": statistics.fmean(lat),
            "ops_per_s": self.ops / self.seconds if self.seconds else 0.0,
            "samples": len(lat),
        }


@dataclass(frozen=True)
class Environment:
    """Where and with what a run was measured: results from several machines can be told apart."""

    host: str = ""
    date: str = ""
    python: str = ""
    stepmesh: str = ""
    torch: str = ""
    ucx: str = ""
    cpu: str = ""
    device: str = ""  # the GPU's name, or "cpu"
    devices: int = 0  # GPUs visible
    mps: bool = False  # the CUDA MPS daemon was serving this run's processes
    lane: bool = False  # stepmesh's nodes opened the device lane (STEPMESH_DEVICE_LANE, by default on a GPU host)
    memtype_cache: str = ""  # UCX_MEMTYPE_CACHE as UCX reads it in this run's processes (import ucxx sets "n")
    memory_hints: str = ""  # STEPMESH_MEMORY_HINTS of stepmesh's nodes ("": a run saved before it was recorded)
    one_sided: str = ""  # STEPMESH_ONE_SIDED of stepmesh's nodes ("": a run saved before it was recorded)
    core: str = ""  # the compiled core's module
    dlpack: bool = False  # the core read tensors through torch's DLPack C exchange API (else torch's getters)

    @classmethod
    def here(cls, device: str) -> Environment:
        """This machine, now (the MPS daemon is seen through its pipe directory)."""
        import torch

        import stepmesh
        import stepmesh.data  # binds torch to the core, as in stepmesh's nodes
        from stepmesh._core import core
        from stepmesh.config import Config
        from stepmesh.control.transport import ucx_version

        name, count = "cpu", 0
        if device.startswith("cuda") and torch.cuda.is_available():
            count = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0) + (" (ROCm)" if getattr(torch.version, "hip", None) else "")
        return cls(
            host=socket.gethostname(),
            date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            python=platform.python_version(),
            stepmesh=stepmesh.__version__,
            torch=torch.__version__,
            ucx=ucx_version(),
            cpu=f"{platform.machine()}, {_cores()} cores",
            device=name,
            devices=count,
            mps=mps_running() if device.startswith("cuda") else False,
            lane=Config.from_env().lane_on(),
            memtype_cache=ucx_memtype_cache(),
            memory_hints=Config.from_env().memory_hints,
            one_sided=Config.from_env().one_sided,
            core=core.__file__ or "",
            dlpack=core.dlpack_bound(),
        )

    def describe(self) -> str:
        gpu = (
            f"{self.device} x{self.devices}, MPS {'on' if self.mps else 'off'}, lane {'on' if self.lane else 'off'}"
            + (f", UCX memory-type cache {self.memtype_cache}" if self.memtype_cache else "")
            if self.devices else "no GPU"
        ) + (f", memory hints {self.memory_hints}" if self.memory_hints else "") \
            + (f", one-sided {self.one_sided}" if self.one_sided else "") \
            + (", tensors read through DLPack" if self.dlpack else "")
        return (
            f"{self.host} {self.date}: stepmesh {self.stepmesh}, torch {self.torch}, UCX {self.ucx}, "
            f"Python {self.python}, {self.cpu}, {gpu}"
        )


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def ucx_memtype_cache() -> str:
    """UCX_MEMTYPE_CACHE as UCX reads it here: ``import ucxx`` sets it to ``n`` unless it is set already.

    Its child processes inherit it, so stepmesh's nodes and the floors run with it too.
    """
    import os

    from stepmesh.control.transport import ucx_version

    ucx_version()  # imports ucxx, which fills in its defaults first
    value = os.environ.get("UCX_MEMTYPE_CACHE", "try")  # UCX's own default where nothing set it
    return {"n": "off", "no": "off", "y": "on", "yes": "on", "try": "on (try)"}.get(value.lower(), value)


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon serves this process's clients (its pipe is where CUDA looks)."""
    import os

    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_dir, "control"))


@dataclass
class BenchResult:
    options: BenchOptions
    contenders: dict[str, ContenderResult]
    traces: dict[str, dict[str, float]]  # server -> stage -> median us
    ucx_options: dict[str, str] = field(default_factory=dict)  # of stepmesh's data workers and the ucxx floor
    environment: Environment = field(default_factory=Environment)
    trace_rounds: list[dict[str, dict[str, float]]] = field(default_factory=list)  # `traces` of each measured round

    def to_json(self) -> dict[str, Any]:
        base = self.contenders.get("stepmesh")
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "environment": asdict(self.environment),
            "workload": asdict(self.options.workload),
            "options": {k: v for k, v in asdict(self.options).items() if k != "workload"},
            "contenders": {},
            "trace_breakdown_us": self.traces,
            "trace_breakdown_by_round_us": self.trace_rounds,
            "ucx_options": self.ucx_options,
        }
        for name, c in self.contenders.items():
            st = c.stats()
            entry: dict[str, Any] = {
                "stats": st, "note": c.note, "seconds": c.seconds, "ops": c.ops, "latencies_us": c.latencies_us,
            }
            if base is not None and st and base.stats() and name != "stepmesh":
                entry["stepmesh_over_this_p50"] = base.stats()["p50_us"] / st["p50_us"]
            out["contenders"][name] = entry
        return out

    @classmethod
    def from_json(cls, doc: Any) -> BenchResult:
        """The result that :meth:`to_json` wrote (schema ``stepmesh-bench/2``; ``/1`` files read too).

        Raises:
            ValueError: not such a document, or a field is missing or malformed.
        """
        schemas = (SCHEMA, "stepmesh-bench/1")
        if not isinstance(doc, dict) or doc.get("schema") not in schemas:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"not a stepmesh bench result (schema {SCHEMA} expected, found {found!r})")
        try:
            wl = doc["workload"]

            def specs(items: Any) -> tuple[TensorSpec, ...]:
                return tuple(TensorSpec(tuple(int(d) for d in t["shape"]), str(t["dtype"])) for t in items)

            workload = Workload(str(wl["name"]), specs(wl["push"]), specs(wl["pull"]), int(wl["workers"]), int(wl["servers"]))
            known = BenchOptions.__dataclass_fields__
            given = {k: v for k, v in doc["options"].items() if k in known and k != "workload"}
            if "contenders" in given:
                given["contenders"] = tuple(given["contenders"])
            options = BenchOptions(workload=workload, **given)
            contenders = {}
            for name, entry in doc["contenders"].items():
                lat = [float(x) for x in entry["latencies_us"]]
                st = entry.get("stats") or {}
                ops = int(entry.get("ops", st.get("samples", len(lat))))
                rate = st.get("ops_per_s", 0.0)
                seconds = float(entry.get("seconds", ops / rate if rate else 0.0))
                contenders[name] = ContenderResult(name, lat, seconds, ops, str(entry.get("note", "")))

            def stage_medians(d: Any) -> dict[str, dict[str, float]]:
                return {str(k): {str(n): float(v) for n, v in stages.items()} for k, stages in d.items()}

            traces = stage_medians(doc["trace_breakdown_us"])
            by_round = [stage_medians(r) for r in doc.get("trace_breakdown_by_round_us", [])]
            ucx = {str(k): str(v) for k, v in doc.get("ucx_options", {}).items()}
            env_doc = doc.get("environment") or {}
            env = Environment(**{k: v for k, v in env_doc.items() if k in Environment.__dataclass_fields__})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed stepmesh bench result: {type(e).__name__}: {e}") from e
        return cls(options, contenders, traces, ucx, env, by_round)
