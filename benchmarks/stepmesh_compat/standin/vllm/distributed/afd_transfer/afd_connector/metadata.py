from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AFDConnectorMetadata:
    layer_idx: int
    stage_idx: int
    seq_lens: list[int]
    dtype: Any = None
    device: Any = None
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create_attention_metadata(cls, layer_idx: int, stage_idx: int, seq_len: int, dtype: Any, device: Any,
                                  request_id: str = "") -> AFDConnectorMetadata:
        return cls(layer_idx, stage_idx, [seq_len], dtype, device, request_id)

    @classmethod
    def create_ffn_metadata(cls, layer_idx: int, stage_idx: int, seq_lens: list[int], dtype: Any, device: Any,
                            request_id: str = "") -> AFDConnectorMetadata:
        return cls(layer_idx, stage_idx, list(seq_lens), dtype, device, request_id)

    @property
    def is_single_sequence(self) -> bool:
        return len(self.seq_lens) == 1

    @property
    def total_tokens(self) -> int:
        return sum(self.seq_lens)

    def validate_tensor_shape(self, shape: Any) -> bool:
        return len(shape) > 0 and shape[0] == self.total_tokens

    def get_split_indices(self) -> list[int]:
        return list(itertools.accumulate(self.seq_lens))[:-1]
