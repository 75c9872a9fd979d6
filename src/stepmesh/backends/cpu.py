"""Host memory: always available; UCX reaches it by shared memory, TCP or RDMA."""

from __future__ import annotations

from . import Backend


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    ucx_transports = ("posix", "sysv", "cma", "knem", "xpmem", "tcp", "rc", "dc", "ud")

    def available(self) -> tuple[bool, str]:
        return True, ""

    def is_device(self) -> bool:
        return False

    def devices(self) -> list[str]:
        import os

        return [f"cpu ({os.cpu_count()} cores)"]
