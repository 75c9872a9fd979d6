from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AFDConfig:
    afd_connector: str = "stepmesh"
    afd_role: str = "attention"  # or "ffn"
    afd_port: int = 1239
    afd_host: str = "127.0.0.1"
    num_afd_stages: int = 3
    num_attention_servers: int = 1
    num_ffn_servers: int = 1
    afd_server_rank: int = 0


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 96


@dataclass
class VllmConfig:
    afd_config: AFDConfig = field(default_factory=AFDConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
