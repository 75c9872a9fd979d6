"""A connector for vLLM's AFD plugin (vllm-project/afd-plugin) on stepmesh: ``StepMeshAFDConnector``.

It implements afd-plugin's ``AFDConnectorBase``. Ranks map as in the plugin's
P2P connector: every FFN rank serves ``num_attention_ranks / num_ffn_ranks``
consecutive Attention ranks. In stepmesh terms each FFN rank and its Attention
ranks form an instance group (one server, ``ratio`` workers); FFN rank 0
starts the scheduler (``stepmesh scheduler``, a child process) unless
``connector_extra_config`` says otherwise.

The Attention side pushes the caller's hidden states as they are, with no
copy (ordered after the current stream; they must not be written until the
matching ``recv_ffn_output``), and ``recv_ffn_output`` returns a view of the
stage's receive buffer, into which the FFN output landed (valid until that
stage's next ``send_attn_output``). The FFN side receives each rank's hidden
states into buffers of its own (``torch.cat`` joins them when it serves more
than one Attention rank), and ``send_ffn_output`` answers every Attention rank
from the FFN output's rows: sent from the output itself when the current
stream has finished (the call returns once the ranks have taken them), or
staged by one device copy while it is still computing, so that the output
may be reused as soon as the call returns. Any number of stages may be in
flight (one push_pull each).

Use it by importing this module (it registers itself with the plugin's
connector factory) and setting, in vLLM's ``additional_config``::

    {"afd": {"connector": "StepMeshAFDConnector", "role": "attention" | "ffn",
             "host": SCHEDULER_HOST, "port": SCHEDULER_PORT,
             "num_attention_ranks": A, "num_ffn_ranks": F,
             "connector_extra_config": {"max_tokens": 256}}}

See docs/integrations.md for every option.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

import stepmesh

from ..config import Config
from ..errors import ConfigError

try:
    from afd_plugin.connectors.base import AFDConnectorBase, ConnectorExtraInfo
    from afd_plugin.connectors.metadata import (
        AFDA2FTransferPayload,
        AFDTransferContext,
        AFDTransferMetadata,
        AFDTransferState,
    )
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"stepmesh.integrations.vllm needs vLLM's AFD plugin (pip install afd-plugin, from vllm-project/afd-plugin): {e}"
    ) from e

__all__ = ["StepMeshAFDConnector", "StepMeshExtraInfo", "StepMeshTransferState"]

_SCHEDULER_WAIT_S = 30.0


@dataclass(frozen=True)
class StepMeshExtraInfo(ConnectorExtraInfo):  # type: ignore[misc]
    """``connector_extra_config`` of the stepmesh connector (every key optional).

    Attributes:
        max_tokens: tokens one Attention rank sends per stage at most (its receive buffers' rows);
            default: vLLM's ``max_num_batched_tokens``.
        stages: micro-batch stages in flight (receive buffers are made per stage); default 3.
        start_scheduler: whether FFN rank 0 starts the scheduler; default True.
        progress: ``STEPMESH_PROGRESS`` (``polling``, ``blocking``, ``thread``); default stepmesh's.
        transports: ``STEPMESH_TRANSPORTS`` (UCX transports, comma-separated); default: what UCX finds.
    """

    max_tokens: int | None = None
    stages: int = 3
    start_scheduler: bool = True
    progress: str | None = None
    transports: str | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> StepMeshExtraInfo:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise TypeError("the stepmesh connector's connector_extra_config must be a mapping")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown stepmesh connector option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**dict(raw))

    def to_mapping(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(slots=True)
class StepMeshTransferState(AFDTransferState):  # type: ignore[misc]
    """What the FFN side keeps between receiving a stage and answering it: one request handle per Attention rank."""

    handles: list[int]


class StepMeshAFDConnector(AFDConnectorBase):  # type: ignore[misc]
    """afd-plugin's connector interface over stepmesh's push_pull / get_batch / respond_vec."""

    @classmethod
    def parse_extra_config(cls, raw: Mapping[str, Any] | None) -> StepMeshExtraInfo:
        return StepMeshExtraInfo.from_mapping(raw)

    def __init__(self, rank: int, local_rank: int, vllm_config: Any, afd_config: Any, role_rank: int) -> None:
        super().__init__(rank, local_rank, vllm_config, afd_config, role_rank)
        a, f = afd_config.num_attention_ranks, afd_config.num_ffn_ranks
        if a < f or a % f:
            raise ValueError(f"num_attention_ranks ({a}) must be a multiple of num_ffn_ranks ({f})")
        self.attn_size, self.ffn_size = a, f
        self.ratio = a // f
        extra: StepMeshExtraInfo = self.extra_info
        self.stages = extra.stages
        model = vllm_config.model_config
        self.hidden_size = int(model.hf_config.hidden_size)
        self.dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
        self.max_tokens = int(extra.max_tokens or vllm_config.scheduler_config.max_num_batched_tokens)
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        attention = afd_config.role == "attention"
        group = role_rank // self.ratio if attention else role_rank
        # STEPMESH_*/DMLC_* in the environment (auth token, heartbeats, timeouts) apply; the mesh's shape comes from here.
        optional: dict[str, Any] = {
            "progress": extra.progress,
            "transports": tuple(extra.transports.split(",")) if extra.transports else None,
            "backend": "cuda" if self.device.type == "cuda" else None,
        }
        self.config = Config.from_env(
            role="worker" if attention else "server", num_workers=self.ratio, num_servers=1, group_size=f,
            node_rank=role_rank % self.ratio if attention else 0, gpu=local_rank, rank_offset=group - local_rank,
            root_uri=afd_config.host, root_port=afd_config.port,
            **{k: v for k, v in optional.items() if v is not None},
        )
        self._start_scheduler = not attention and role_rank == 0 and extra.start_scheduler
        self._scheduler: subprocess.Popen[bytes] | None = None
        self._initialized = False
        self._recv: list[torch.Tensor] = []
        self._pending: dict[int, tuple[int, int]] = {}  # stage -> (push_pull handle, tokens)
        self.num_layers = int(getattr(model.hf_config, "num_hidden_layers", 0) or 0)
        self._layers_seen: dict[int, int] = {}  # FFN side: stage -> the layer its next arrival belongs to

    # ------------------------------------------------------------ lifecycle
    def init_afd_connector(self) -> None:
        """Join the mesh (FFN rank 0 first starts the scheduler); collective over every rank. Idempotent.

        Raises:
            stepmesh.StepMeshError: the mesh did not come together (a rank missing, a port taken).
        """
        if self._initialized:
            return
        if self._start_scheduler:
            env = dict(os.environ)
            env.update(self.config.replace(role="scheduler", node_rank=None, gpu=0, rank_offset=0).to_env())
            self._scheduler = subprocess.Popen([sys.executable, "-m", "stepmesh.cli", "scheduler"], env=env)
            self._wait_for_scheduler()
        stepmesh.init(self.config)
        if self.config.role == "worker":
            self._recv = [torch.empty(self.max_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
                          for _ in range(self.stages)]
        self._initialized = True

    def _wait_for_scheduler(self) -> None:
        import socket

        deadline = time.monotonic() + _SCHEDULER_WAIT_S
        while time.monotonic() < deadline:
            assert self._scheduler is not None
            if self._scheduler.poll() is not None:
                raise ConfigError(f"the stepmesh scheduler exited at once (code {self._scheduler.returncode})")
            try:
                socket.create_connection((self.config.root_uri, self.config.root_port or 0), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise ConfigError(f"the stepmesh scheduler did not listen on {self.config.root_uri}:{self.config.root_port}")

    def close(self) -> None:
        """Leave the mesh (a global barrier of every rank) and stop the scheduler this rank started. Idempotent."""
        if self._initialized:
            self._initialized = False
            stepmesh.stop()
        if self._scheduler is not None:
            try:
                self._scheduler.wait(timeout=_SCHEDULER_WAIT_S)
            except subprocess.TimeoutExpired:
                self._scheduler.kill()
                self._scheduler.wait()
            self._scheduler = None

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    # ------------------------------------------------------ Attention side
    def send_attn_output(self, hidden_states: torch.Tensor, context: Any, **kwargs: Any) -> None:
        """Push ``hidden_states`` (``[tokens, hidden]``) of one stage to this rank's FFN rank; returns at once.

        Raises:
            ValueError: a shape that does not match the metadata or the receive buffers.
            RuntimeError: not initialized, or that stage's previous answer not received yet.
        """
        if not self._initialized:
            raise RuntimeError("StepMeshAFDConnector.send_attn_output before init_afd_connector()")
        metadata = context.metadata
        n = hidden_states.shape[0]
        if not metadata.validate_tensor_shape(tuple(hidden_states.shape)):
            raise ValueError(f"hidden_states of shape {tuple(hidden_states.shape)} do not match {metadata.total_tokens} tokens")
        if n > self.max_tokens or hidden_states.shape[1:] != (self.hidden_size,):
            raise ValueError(
                f"hidden_states of shape {tuple(hidden_states.shape)}: at most {self.max_tokens} tokens of "
                f"{self.hidden_size} (connector_extra_config max_tokens)"
            )
        stage = metadata.stage_idx
        if stage in self._pending:
            raise RuntimeError(f"stage {stage}: the previous answer was not received yet (recv_ffn_output)")
        handle = stepmesh.push_pull([hidden_states.contiguous()], [stage], [self._recv[stage][:n]], [stage])
        self._pending[stage] = (handle, n)

    def recv_ffn_output(self, ref_tensor: torch.Tensor | None = None, ubatch_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        """The FFN output of stage ``ubatch_idx``: a view of its receive buffer (valid until the stage's next send).

        Raises:
            RuntimeError: nothing was sent for that stage.
            stepmesh.TimeoutError: no answer within the wait's timeout (the stage stays pending: call again).
            stepmesh.StepMeshError: the FFN rank failed or refused (its reason).
        """
        entry = self._pending.get(ubatch_idx)
        if entry is None:
            raise RuntimeError(f"recv_ffn_output: nothing was sent for stage {ubatch_idx}")
        handle, n = entry
        try:
            stepmesh.wait(handle)
        except stepmesh.TimeoutError:
            raise  # still in flight: a later call waits for the same answer
        except BaseException:
            del self._pending[ubatch_idx]
            raise
        del self._pending[ubatch_idx]
        return self._recv[ubatch_idx][:n]

    # ------------------------------------------------------------ FFN side
    def recv_attn_output(self, ubatch_idx: int = 0, **kwargs: Any) -> Any:
        """The next stage's hidden states from every Attention rank of this FFN rank, concatenated by tokens.

        Stages are taken in the order the Attention ranks sent them; the
        metadata's ``stage_idx`` says which one this is (``ubatch_idx`` is not
        used to pick one), and ``layer_idx`` counts that stage's arrivals modulo
        the model's ``num_hidden_layers`` (the key carries only the stage, so
        that a model's layers share one request layout).

        Returns:
            ``AFDA2FTransferPayload``; its context's metadata holds each rank's token count.

        Raises:
            RuntimeError: every Attention rank has stopped (no stage will come any more).
            stepmesh.StepMeshError: an Attention rank died, or the mesh failed.
        """
        batch = stepmesh.get_batch()
        if not batch:
            raise RuntimeError("recv_attn_output: every Attention rank has stopped; no stage will come")
        tensors = [ts[0] for _, ts, _ in batch]
        hidden = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        stage = int(batch[0][2][0])
        layer = self._layers_seen.get(stage, 0)
        self._layers_seen[stage] = (layer + 1) % self.num_layers if self.num_layers else layer + 1
        metadata = AFDTransferMetadata.create_ffn_metadata(
            layer_idx=layer, stage_idx=stage, seq_lens=[t.shape[0] for t in tensors]
        )
        state = StepMeshTransferState(handles=[h for h, _, _ in batch])
        return AFDA2FTransferPayload(hidden_states=hidden, context=AFDTransferContext(metadata=metadata, states=state))

    def send_ffn_output(self, ffn_output: torch.Tensor, context: Any, **kwargs: Any) -> None:
        """Answer every Attention rank of the stage with its rows of ``ffn_output`` (reusable at once).

        Raises:
            ValueError: the output does not match the metadata's token counts.
        """
        metadata = context.metadata
        if not metadata.validate_tensor_shape(tuple(ffn_output.shape)):
            raise ValueError(f"ffn_output of shape {tuple(ffn_output.shape)} does not match {metadata.total_tokens} tokens")
        rows = list(torch.split(ffn_output, metadata.seq_lens, dim=0))
        stepmesh.respond_vec(ffn_output.contiguous(), rows, list(context.states.handles))


def _register() -> None:
    """Make the plugin's factory know the connector by name (where the plugin has a factory)."""
    try:
        from afd_plugin.connectors.factory import AFDConnectorFactory
    except ImportError:
        return
    try:
        AFDConnectorFactory.register_connector("StepMeshAFDConnector", __name__, "StepMeshAFDConnector")
    except ValueError:  # registered already (the module imported twice)
        pass


_register()
