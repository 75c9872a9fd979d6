"""Drives StepMesh's vLLM AFD connector (as rewritten by run.py) the way vLLM's attention and FFN workers call it.

    python connector_driver.py attention|ffn LAYERS STAGES DEVICE PORT

Attention: per layer and stage, ``send_attn_output`` of a fresh hidden state
(dynamic token counts), then ``recv_ffn_output`` one layer later, and checks
the answer in the connector's receive buffer. FFN: ``recv_attn_output``, the
"FFN" ``x * 2 + 1`` computed on the current stream, ``send_ffn_output``.
Prints one RESULT line.
"""

from __future__ import annotations

import sys

import torch
from stepmesh_connector import StepMeshAFDConnector  # the StepMesh file, import line changed
from vllm.config import AFDConfig, ParallelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.afd_transfer.afd_connector.metadata import AFDConnectorMetadata

import stepmesh

role, layers, stages, device, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
config = VllmConfig(
    afd_config=AFDConfig(afd_role=role, afd_port=port, afd_host="127.0.0.1", num_afd_stages=stages),
    parallel_config=ParallelConfig(),
    scheduler_config=SchedulerConfig(max_num_batched_tokens=16 * stages),
)
connector = StepMeshAFDConnector(rank=0, local_rank=0, config=config)
connector.init_afd_connector()
checked = wrong = 0
if role == "attention":
    pending: list[tuple[int, torch.Tensor]] = []

    def receive() -> None:
        global checked, wrong
        stage, x = pending.pop(0)
        connector.recv_ffn_output()
        got = connector.recv_buffer[stage][0][: x.shape[0]]
        checked += 1
        wrong += not torch.equal(got, x * 2 + 1)

    for layer in range(layers):
        for stage in range(stages):
            if layer > 0:
                receive()
            seq = 1 + (layer * 5 + stage * 3) % 16
            x = torch.randn(seq, 7168, device=device).to(torch.bfloat16)  # made on the stream, not synchronised
            connector.send_attn_output(x, AFDConnectorMetadata.create_attention_metadata(layer, stage, seq, x.dtype, x.device))
            pending.append((stage, x))
    while pending:
        receive()
else:
    for _ in range(layers * stages):
        merged, metadata = connector.recv_attn_output()
        connector.send_ffn_output(merged * 2 + 1, metadata)
        checked += 1
connector.close()
stepmesh.stop()
print(f"RESULT {role}: {checked} answers {'checked' if role == 'attention' else 'sent'}, {wrong} wrong", flush=True)
sys.exit(1 if wrong else 0)
