"""SimpleNotify off the GPU: a clear error at init(), never a crash or a hang."""

from __future__ import annotations

import pytest
import torch

import stepmesh as f


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: tests/test_gpu.py covers it")
def test_init_without_cuda_is_a_clear_config_error():
    sig = f.SimpleNotify()
    with pytest.raises(f.ConfigError, match="CUDA"):
        sig.init()


def test_calls_before_init_or_out_of_order_are_clear_errors():
    sig = f.SimpleNotify()
    with pytest.raises(f.StepMeshError, match="get_future_batch_data"):
        sig.get_future_batch_data()
    sig.wait_event_done()  # nothing pending: returns at once
