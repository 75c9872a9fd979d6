"""The data plane: push_pull/wait (worker) and get_batch/respond (server) over the compiled core.

Importing it checks that the compiled core was built from this version of the
wire format (``wire.py``), and tells the core torch's tensor type and dtypes.
"""

import torch

from .._core import core as _core
from . import wire
from .tensors import DTYPE_CODE

wire.check_core(_core.constants())
_core.bind_torch(torch.Tensor, DTYPE_CODE, torch.empty)

__all__ = ["wire"]
