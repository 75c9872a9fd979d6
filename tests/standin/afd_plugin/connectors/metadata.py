from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class AFDTransferState:
    pass


@dataclass(slots=True)
class AFDTransferMetadata:
    layer_idx: int
    stage_idx: int
    seq_lens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.seq_lens)

    @classmethod
    def create_attention_metadata(cls, *, layer_idx: int, stage_idx: int, seq_len: int) -> AFDTransferMetadata:
        return cls(layer_idx=layer_idx, stage_idx=stage_idx, seq_lens=[seq_len])

    @classmethod
    def create_ffn_metadata(cls, *, layer_idx: int, stage_idx: int, seq_lens: list[int]) -> AFDTransferMetadata:
        return cls(layer_idx=layer_idx, stage_idx=stage_idx, seq_lens=list(seq_lens))

    def validate_tensor_shape(self, tensor_shape: tuple[int, ...]) -> bool:
        return len(tensor_shape) > 0 and tensor_shape[0] == self.total_tokens


@dataclass(slots=True)
class AFDTransferContext:
    metadata: AFDTransferMetadata
    states: AFDTransferState | None = None


@dataclass(slots=True)
class AFDA2FTransferPayload:
    hidden_states: Any
    context: AFDTransferContext
    router_logits: Any = None
