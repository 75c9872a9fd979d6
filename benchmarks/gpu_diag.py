import sys, time, traceback
import torch
from stepmesh.testing import run_mesh, MeshError

def node(ctx):
    import stepmesh as f
    reg, shapes = ctx.args
    f.init()
    specs = [((64, 7168), torch.bfloat16), ((1,), torch.int32)][: shapes]
    if ctx.role == "server":
        if reg:
            for i, (sh, dt) in enumerate(specs):
                n = torch.empty(sh, dtype=dt).nbytes
                f.register_recv_buffer(torch.empty(n, dtype=torch.uint8, device="cuda"), [0], [i])
        ans = [torch.ones(sh, dtype=dt, device="cuda") for sh, dt in specs]
        for _ in range(20):
            (h, ts, ks), = f.get_batch(timeout_ms=20000) or [(None, None, None)]
            if h is None:
                return "server: no batch in 20 s"
            f.respond(ans, h)
    else:
        push = [torch.ones(sh, dtype=dt, device="cuda") for sh, dt in specs]
        pull = [torch.zeros(sh, dtype=dt, device="cuda") for sh, dt in specs]
        for i in range(20):
            f.wait(f.push_pull(push, list(range(len(push))), pull, list(range(len(pull)))), timeout_ms=5000)
    f.stop()
    return "ok"

if __name__ == "__main__":
    prog = sys.argv[1]
    for reg in (False, True):
        for shapes in (1, 2):
            t = time.time()
            try:
                r = run_mesh(node, env={"STEPMESH_PROGRESS": prog, "STEPMESH_BACKEND": "GPU"}, args=(reg, shapes), timeout=45)
                print(prog, "registered" if reg else "fresh", shapes, "tensors:", r, "%.1fs" % (time.time() - t), flush=True)
            except Exception as e:
                print(prog, "registered" if reg else "fresh", shapes, "tensors: FAILED", str(e)[-1500:], flush=True)
