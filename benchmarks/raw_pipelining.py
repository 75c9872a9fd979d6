"""What UCX itself gains from several exchanges in flight: raw tag traffic, no stepmesh bookkeeping.

    python benchmarks/raw_pipelining.py --bytes 917508 --depth 1 --depth 3

A client and a server process (pinned to their own cores), each a polling
data worker with stepmesh's UCX options. The client keeps ``depth``
exchanges in flight: each sends ``bytes`` and receives as many back; the
server answers each as it arrives. Prints exchanges per second per depth, so
that `stepmesh bench --stages N` can be read against what the transport
allows on the same machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import click

_TIMEOUT_S = 120.0


def _side(role: str, conn: Any, nbytes: int, depth: int, iters: int) -> None:
    import torch

    from stepmesh.control.transport import Transport
    from stepmesh.data.wire import UCX_OPTIONS as DATA_UCX_OPTIONS

    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[(role == "server") % len(cores)]})
    tp = Transport(dict(DATA_UCX_OPTIONS), "polling")
    conn.send(tp.address)
    endpoint = tp.connect(conn.recv())  # kept: the handle is valid while the endpoint lives
    ep, ops = endpoint.handle, tp.ucp
    bufs = [(torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)) for _ in range(depth)]
    deadline = time.monotonic() + _TIMEOUT_S

    def wait(reqs: list[Any]) -> None:
        while not ops.wait(reqs, 4096):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role}: an exchange did not complete within {_TIMEOUT_S:.0f} s")

    try:
        if role == "server":
            posted = [ops.recv(bufs[i][1].data_ptr(), nbytes, 100 + i) for i in range(depth)]
            sends: list[Any] = []
            for k in range(iters):
                i = k % depth
                wait([posted[i]])
                sends.append(ops.send(ep, bufs[i][0].data_ptr(), nbytes, 200 + i))
                if len(sends) >= depth:
                    wait([sends.pop(0)])
                posted[i] = ops.recv(bufs[i][1].data_ptr(), nbytes, 100 + i)
            wait(sends)
            conn.send(None)
            return
        in_flight: list[list[Any]] = []
        t0 = time.perf_counter()
        for k in range(iters):
            i = k % depth
            if len(in_flight) == depth:
                wait(in_flight.pop(0))
            answer = ops.recv(bufs[i][1].data_ptr(), nbytes, 200 + i)
            in_flight.append([answer, ops.send(ep, bufs[i][0].data_ptr(), nbytes, 100 + i)])
        for reqs in in_flight:
            wait(reqs)
        conn.send(iters / (time.perf_counter() - t0))
    finally:
        tp.close()


def measure(nbytes: int, depth: int, iters: int) -> float:
    """Exchanges per second with ``depth`` in flight.

    Raises:
        RuntimeError: a side failed or did not answer within the timeout.
    """
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=_side, args=(role, pipe[1], nbytes, depth, iters), daemon=True)
        for role, pipe in zip(("client", "server"), pipes)
    ]
    for p in procs:
        p.start()
    try:
        ours = [pipe[0] for pipe in pipes]
        for conn in ours:
            if not conn.poll(_TIMEOUT_S):
                raise RuntimeError("a side did not start")
        client_address, server_address = (conn.recv() for conn in ours)
        ours[0].send(server_address)
        ours[1].send(client_address)
        if not ours[0].poll(_TIMEOUT_S):
            raise RuntimeError("the client did not finish")
        rate = ours[0].recv()
        if not ours[1].poll(_TIMEOUT_S):
            raise RuntimeError("the server did not finish")
        ours[1].recv()
        return float(rate)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@click.command()
@click.option("--bytes", "nbytes", type=click.IntRange(min=1), default=917_508, show_default=True,
              help="Bytes each way per exchange (stepmesh-1x1's).")
@click.option("--depth", type=click.IntRange(min=1, max=64), multiple=True, default=(1, 3), show_default=True,
              help="Exchanges in flight (repeat the option for several).")
@click.option("--iters", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="Alternating rounds.")
def main(nbytes: int, depth: tuple[int, ...], iters: int, repeat: int) -> None:
    for _ in range(repeat):
        for d in depth:
            click.echo(f"{nbytes} B each way, {d} in flight: {measure(nbytes, d, iters):,.0f} exchanges/s")


if __name__ == "__main__":
    main()
