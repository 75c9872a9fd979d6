"""``stepmesh bench``: push_pull round trips against their floors, interleaved in one run.

Contenders, each in a module of its own:

- ``stepmesh`` (:mod:`.stepmesh_node`): a real mesh doing push_pull, stages in flight.
- ``perftest`` (:mod:`.perftest`): UCX's own C benchmark, ``ucx_perftest -t tag_lat``: the C floor.
- ``ucxx`` (:mod:`.raw_ucxx`): raw ucxx tag ping-pong of the same bytes: the Python floor.
- ``protocol`` (:mod:`.protocol`): stepmesh's messages with none of its bookkeeping.
- ``gloo``/``nccl`` (:mod:`.dist`): torch.distributed send/recv of the same bytes.
- ``nixl`` (:mod:`.nixl`): NIXL WRITE + notification, where installed.
"""

from .command import bench
from .engine import run_bench
from .model import PRESETS, BenchOptions, BenchResult, ContenderResult, Environment, TensorSpec, Workload
from .report import plot, read_json, summarize, write_json

__all__ = [
    "bench", "run_bench", "PRESETS", "BenchOptions", "BenchResult", "ContenderResult", "Environment", "TensorSpec",
    "Workload", "plot", "read_json", "summarize", "write_json",
]
