from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class AFDConfig:
    connector: str = "StepMeshAFDConnector"
    role: str = "attention"
    port: int = 1239
    host: str = "127.0.0.1"
    num_attention_ranks: int = 1
    num_ffn_ranks: int = 1


def connector_extra_config_from_source(source: Any) -> dict[str, Any]:
    afd = (getattr(source, "additional_config", None) or {}).get("afd")
    if not isinstance(afd, Mapping):
        return {}
    return dict(afd.get("connector_extra_config") or {})
