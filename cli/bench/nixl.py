"""The ``nixl`` contender: NIXL (where installed) WRITE into the peer's buffer with a notification, each way.

The library vLLM uses for KV transfer; its progress thread stays off (on small
machines it costs milliseconds); progress is made by polling.
"""

from __future__ import annotations

import os
from typing import Any

from .common import pin, serve_ping_pong
from .model import BenchOptions

__all__ = ["nixl_child"]


def nixl_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    """NIXL ping-pong: WRITE into the peer's buffer with a notification, the peer answers likewise.

    The progress thread stays off (on small machines it costs milliseconds);
    progress is made by polling the transfer state and the notifications.
    """
    pin(core)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARNING")  # its INFO lines would interleave with the table
    try:
        import torch
        from nixl._api import nixl_agent, nixl_agent_config

        wl = opts.workload
        n_send = wl.push_bytes if role == "client" else wl.pull_bytes
        n_recv = wl.pull_bytes if role == "client" else wl.push_bytes
        send_t = torch.zeros(n_send, dtype=torch.uint8, device=opts.device)
        recv_t = torch.zeros(n_recv, dtype=torch.uint8, device=opts.device)
        agent = nixl_agent(f"stepmesh-bench-{role}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        agent.register_memory([send_t, recv_t])
        conn.send(("ok", agent.get_agent_metadata(), agent.get_serialized_descs(agent.get_xfer_descs([recv_t]))))
    except Exception as e:  # reported as the contender's note, not a failed run
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    meta, descs = conn.recv()
    peer = agent.add_remote_agent(meta)
    handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs([send_t]), agent.deserialize_descs(descs), peer, b"n")
    notes = 0  # notifications received and not yet consumed

    def write() -> None:
        agent.transfer(handle)
        while (state := agent.check_xfer_state(handle)) != "DONE":
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")

    def answered() -> None:
        nonlocal notes
        while not notes:
            notes += sum(len(v) for v in agent.get_new_notifs().values())  # one peer only
        notes -= 1

    def one() -> None:
        if role == "client":
            write()
            answered()
        else:
            answered()
            write()

    serve_ping_pong(conn, one)
    agent.release_xfer_handle(handle)
