"""The exceptions of stepmesh: one root, a few named kinds."""

from __future__ import annotations

__all__ = [
    "StepMeshError",
    "ArgumentError",
    "ConfigError",
    "PeerError",
    "TimeoutError",
    "ProtocolError",
    "AuthError",
    "TransportError",
]

_builtin_TimeoutError = TimeoutError


class StepMeshError(Exception):
    """Base of every error raised by stepmesh."""


class ConfigError(StepMeshError, ValueError):
    """A configuration value (argument or environment variable) is invalid."""


class ArgumentError(StepMeshError, ValueError):
    """Bad input to an API call, raised before anything is sent; names the argument."""


class PeerError(StepMeshError, ConnectionError):
    """A peer died, left the mesh or refused the request.

    Attributes:
        role: the peer's role (``"worker"``, ``"server"``, ``"scheduler"``) or None.
        rank: the peer's rank within its role, or None.
    """

    def __init__(self, message: str, role: str | None = None, rank: int | None = None):
        super().__init__(message)
        self.role = role
        self.rank = rank


class TimeoutError(StepMeshError, _builtin_TimeoutError):
    """A bounded wait ran out. Also a builtin ``TimeoutError``."""


class ProtocolError(StepMeshError):
    """A malformed, oversized or incompatible message was received."""


class AuthError(StepMeshError):
    """A node failed to authenticate with the scheduler."""


class TransportError(StepMeshError):
    """UCX or the device driver failed an operation on the data path (its status is in the text)."""
