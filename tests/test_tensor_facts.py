"""What the compiled core reads of a tensor (address, size, dtype, shape, device, contiguity, conjugation) is what
torch's own getters say, through torch's DLPack C exchange API and through the getters alike, for views of every
kind hypothesis can make."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepmesh._core import core
from stepmesh.data.tensors import DTYPE_CODE

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HAS_DLPACK = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")


@contextmanager
def _reader(dlpack: bool) -> Iterator[None]:
    core.bind_torch(torch.Tensor, DTYPE_CODE, torch.empty, dlpack)
    try:
        yield
    finally:
        core.bind_torch(torch.Tensor, DTYPE_CODE, torch.empty)


def _expected(t: torch.Tensor) -> tuple[int, int, int, tuple[int, ...], int, bool, bool]:
    return (t.data_ptr(), t.nbytes, DTYPE_CODE[t.dtype], tuple(t.shape), t.get_device(), t.is_contiguous(),
            t.is_conj())


@st.composite
def _views(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPE_CODE, key=str)))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    t = torch.zeros(shape, dtype=dtype)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["slice", "transpose", "expand", "unsqueeze", "select", "conj"]))
        if op == "slice" and t.dim():
            d = draw(st.integers(0, t.dim() - 1))
            lo = draw(st.integers(0, t.shape[d]))
            t = t.narrow(d, lo, draw(st.integers(0, t.shape[d] - lo)))[..., :: draw(st.integers(1, 3))] \
                if draw(st.booleans()) else t.narrow(d, lo, t.shape[d] - lo)
        elif op == "transpose" and t.dim() >= 2:
            t = t.transpose(draw(st.integers(0, t.dim() - 1)), draw(st.integers(0, t.dim() - 1)))
        elif op == "expand" and t.dim() and 1 in t.shape:
            t = t.expand(*[3 if n == 1 else n for n in t.shape])
        elif op == "unsqueeze" and t.dim() < 6:
            t = t.unsqueeze(draw(st.integers(0, t.dim())))
        elif op == "select" and t.dim() and t.shape[0]:
            t = t.select(0, draw(st.integers(0, t.shape[0] - 1)))
        elif op == "conj" and t.is_complex():
            t = t.conj()
    return t


@pytest.mark.parametrize("dlpack", [pytest.param(True, id="dlpack"), pytest.param(False, id="getters")])
@FUZZ
@given(t=_views())
def test_the_core_reads_what_torch_says(dlpack: bool, t: torch.Tensor) -> None:
    if dlpack and not HAS_DLPACK:
        pytest.fail("this torch has no DLPack C exchange API: the suite's torch must (torch 2.10 or later)")
    with _reader(dlpack):
        assert core.dlpack_bound() == dlpack
        assert core.tensor_facts(t) == _expected(t)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dlpack", [True, False])
def test_what_the_wire_cannot_carry_is_not_a_tensor_to_the_core(dlpack: bool) -> None:
    with _reader(dlpack):
        for bad in (torch.zeros(3, device="meta"), torch.zeros(3).to_sparse(), [1.0], None,
                    torch.zeros(3, dtype=torch.complex32)):
            assert core.tensor_facts(bad) is None, bad
        assert core.tensor_facts(torch.zeros([1] * 9)) is None  # more dimensions than the wire carries
