"""NVIDIA and AMD GPU memory through torch's device runtime (CUDA or HIP build).

UCX moves it with its copy engines (``cuda_copy``/``rocm_copy``), peer access
within a host (``cuda_ipc``/``rocm_ipc``) or the NIC (GPUDirect RDMA); nothing
here launches a kernel to move data: the compiled core orders sends after the
caller's stream with the driver's events and stages answers with copy-engine copies.
"""

from __future__ import annotations

from typing import Any

from . import Backend


def _torch() -> Any:
    import torch

    return torch


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    ucx_transports = ("cuda_copy", "cuda_ipc", "gdr_copy", "rc", "dc")
    _hip = False

    def available(self) -> tuple[bool, str]:
        torch = _torch()
        if bool(getattr(torch.version, "hip", None)) != self._hip:
            return False, f"torch {torch.__version__} is not a {'ROCm' if self._hip else 'CUDA'} build"
        if not torch.cuda.is_available():
            return False, "no GPU visible to torch (torch.cuda.is_available() is False)"
        return True, ""

    def is_device(self) -> bool:
        return True

    def devices(self) -> list[str]:
        torch = _torch()
        if not self.available()[0]:
            return []
        return [f"{self.device_type}:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]

    def bind_core(self, core: Any) -> None:
        """The core calls the CUDA driver (HIP on ROCm) itself; it asks torch for the current stream."""
        torch = _torch()
        core.bind_device("hip" if self._hip else "cuda", torch._C._cuda_getCurrentRawStream)

    def set_device(self, index: int) -> None:
        _torch().cuda.set_device(index)


class ROCmBackend(CUDABackend):
    name = "rocm"
    ucx_transports = ("rocm_copy", "rocm_ipc", "rocm_gdr", "rc", "dc")
    _hip = True
