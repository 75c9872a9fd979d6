"""Memory backends: where tensors live and how UCX reaches them.

A backend answers what the data path asks of a memory kind: does a tensor
belong to it, can it run here, which device to select, and how the compiled
core reaches its runtime (for device memory: the driver the core binds to order
sends after the caller's stream and to stage copies without launching kernels).
``cpu`` is always present; ``cuda`` and ``rocm`` import torch's device runtime
only when first used. Third-party backends register
through the ``stepmesh.backends`` entry-point group (``name = "pkg.mod:Class"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError

__all__ = ["Backend", "available", "bind_core_device", "get", "names", "register", "select"]

ENTRY_POINT_GROUP = "stepmesh.backends"


class Backend(ABC):
    """The contract every backend fulfils."""

    #: Registry name (``STEPMESH_BACKEND`` value).
    name: str = ""
    #: torch device type of the tensors it owns (``"cpu"``, ``"cuda"``).
    device_type: str = ""
    #: UCX transports that carry its memory (for ``stepmesh info`` and checks).
    ucx_transports: tuple[str, ...] = ()

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """Whether it can run here, and why not when it cannot."""

    def owns(self, tensor: Any) -> bool:
        """Whether ``tensor`` lives in this backend's memory."""
        return bool(tensor.device.type == self.device_type)

    @abstractmethod
    def is_device(self) -> bool:
        """Whether UCX must treat its memory as device memory."""

    def devices(self) -> list[str]:
        """Human-readable names of the devices it can use."""
        return []

    def set_device(self, index: int) -> None:  # noqa: B027 - one host, no device to choose
        """Make ``index`` the current device of the calling thread."""

    def bind_core(self, core: Any) -> None:
        """Bind the compiled core to this backend's device runtime (its streams, events and copies).

        Raises:
            ConfigError: the backend's memory has no device path in the core.
        """
        raise ConfigError(f"backend {self.name!r} has no device path in stepmesh's core")


_FACTORIES: dict[str, str | type[Backend]] = {
    "cpu": "stepmesh.backends.cpu:CPUBackend",
    "cuda": "stepmesh.backends.cuda:CUDABackend",
    "rocm": "stepmesh.backends.cuda:ROCmBackend",
}
_INSTANCES: dict[str, Backend] = {}
_entry_points_loaded = False


def register(name: str, factory: str | type[Backend]) -> None:
    """Register a backend class (or ``"module:Class"`` path) under ``name``.

    Raises:
        ConfigError: if ``name`` is already taken by a different backend.
    """
    current = _FACTORIES.get(name)
    if current is not None and current != factory:
        raise ConfigError(f"backend {name!r} is already registered ({current!r})")
    _FACTORIES[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _FACTORIES.setdefault(ep.name, ep.value)


def names() -> list[str]:
    """Every registered backend name, built-in and plugged in."""
    _load_entry_points()
    return sorted(_FACTORIES)


def get(name: str) -> Backend:
    """The backend registered as ``name`` (one instance per process).

    Raises:
        ConfigError: if no backend has that name, or it cannot be loaded.
    """
    backend = _INSTANCES.get(name)
    if backend is not None:
        return backend
    _load_entry_points()
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"STEPMESH_BACKEND={name!r}: no such backend; known: {', '.join(names())}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"backend {name!r} cannot be loaded from {factory!r}: {e}") from e
    backend = factory()
    if not isinstance(backend, Backend):
        raise ConfigError(f"backend {name!r} ({factory!r}) does not implement stepmesh.backends.Backend")
    _INSTANCES[name] = backend
    return backend


def available() -> dict[str, tuple[bool, str]]:
    """Each registered backend with whether it can run here and why not."""
    out = {}
    for name in names():
        try:
            out[name] = get(name).available()
        except ConfigError as e:
            out[name] = (False, str(e))
    return out


def select(name: str | None, tensor: Any = None) -> Backend:
    """The backend to use: ``name`` when given, else the one owning ``tensor``, else ``cpu``.

    Raises:
        ConfigError: if the chosen backend is unknown or cannot run here.
    """
    if name is None:
        if tensor is None:
            return get("cpu")
        name = tensor.device.type
        if name == "cuda":
            import torch

            name = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    backend = get(name)
    ok, why = backend.available()
    if not ok:
        raise ConfigError(f"backend {name!r} cannot run here: {why}")
    return backend


def bind_core_device(core: Any, tensor: Any) -> None:
    """Bind the compiled core to the device runtime of ``tensor``'s backend (once per process).

    Raises:
        ConfigError: that backend cannot run here, or has no device path in the core.
    """
    select(None, tensor).bind_core(core)
