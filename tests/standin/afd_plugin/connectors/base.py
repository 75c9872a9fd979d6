from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from afd_plugin.config import connector_extra_config_from_source


@dataclass(frozen=True)
class ConnectorExtraInfo:
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> ConnectorExtraInfo:
        raise NotImplementedError

    def to_mapping(self) -> dict[str, Any]:
        return {}


class AFDConnectorBase:
    control_plane = None
    attn_size: int = 0
    ffn_size: int = 0

    @classmethod
    def parse_extra_config(cls, raw: Mapping[str, Any] | None) -> ConnectorExtraInfo:
        raise NotImplementedError

    def __init__(self, rank: int, local_rank: int, vllm_config: Any, afd_config: Any, role_rank: int) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.vllm_config = vllm_config
        self.afd_config = afd_config
        self.role_rank = role_rank
        self.extra_info = self.parse_extra_config(connector_extra_config_from_source(vllm_config))
