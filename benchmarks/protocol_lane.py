"""``stepmesh bench`` with its ``protocol`` contender sending small device pushes on a second UCX context.

An experiment for the next data-path step, not a contender of its own: UCX
sets its rendezvous threshold per context, so a second context with a
threshold of 0 sends StepMesh's 4-byte device count by rendezvous (with
CUDA-IPC, device to device) while the first keeps small host messages (the
headers) eager. Run it next to a plain ``stepmesh bench`` with the same
arguments (``--contenders stepmesh,protocol,ucxx``) and compare the
``protocol`` rows; on the CPU nothing changes (no device pushes). Figures:
docs/performance.md, "GPU: one H100, MPS on: the push's count, by protocol".
"""

from __future__ import annotations

import functools
import sys

import stepmesh.cli.bench.engine as engine
from stepmesh.cli.bench.protocol import protocol_child
from stepmesh.cli.main import main

if __name__ == "__main__":
    engine.protocol_child = functools.partial(protocol_child, lane=True)  # type: ignore[assignment]
    main(["bench", *sys.argv[1:]], prog_name="stepmesh")
