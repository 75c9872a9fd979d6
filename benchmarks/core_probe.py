"""A build of the compiled core with timers in it, to see where stepmesh's own time goes (measurement only).

    python benchmarks/core_probe.py [OUT]     (default OUT: .probe/ in the checkout; needs Cython here)

copies src/ to OUT/src, puts timers around the core's steps (core.pyx patched by exact text: it fails
loudly when the code moved), generates core.c there, and links OUT/src/stepmesh/cli to cli/. Run
anything with PYTHONPATH=OUT/src first (on a GPU machine, build core.c there with cc as
benchmarks/device_run.sh does). Every process using the core writes the medians of its last 4,096
samples of each step to /tmp/stepmesh-probe/<pid>.txt each time 4,096 more push_pulls (a worker) or
responds (a server) went through, so run at least that many. docs/performance.md shows one reading.
"""
import os
import shutil
import subprocess
import sys

if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
    sys.exit(__doc__)
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dst = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, ".probe"))
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(os.path.join(root, "src"), f"{dst}/src",
                ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "cli"))
p = f"{dst}/src/stepmesh/_core/core.pyx"
with open(p) as fh:
    s = fh.read()


def rep(old: str, new: str) -> None:
    """Replace ``old`` (exactly once in core.pyx) by ``new``."""
    global s
    if s.count(old) != 1:
        sys.exit(f"core_probe: core.pyx changed, this text is there {s.count(old)} times, not once:\n{old}")
    s = s.replace(old, new)

rep("cdef inline uint64_t now_ns() noexcept nogil:", '''cdef uint32_t probe_buf[16][4096]
cdef uint64_t probe_n[16]
cdef str PROBE_NAMES = "pp_total,pp_facts,post_query,send_all,send_header,wait_done,finish,take,parts_after_take,respond_total,answer_query,post_answer,answer_all,-,-,-"

cdef void probe_v(int slot, uint64_t v) noexcept:
    probe_buf[slot][probe_n[slot] & 4095] = <uint32_t>v
    probe_n[slot] += 1
    if (slot == 0 or slot == 9) and (probe_n[slot] & 4095) == 0:
        probe_dump()

cdef void probe(int slot, uint64_t t0) noexcept:
    probe_v(slot, now_ns() - t0)

cdef void probe_dump() noexcept:
    try:
        import os
        os.makedirs("/tmp/stepmesh-probe", exist_ok=True)
        names = PROBE_NAMES.split(",")
        out = []
        for i in range(16):
            n = min(probe_n[i], 4096)
            if n:
                v = sorted([probe_buf[i][k] for k in range(n)])
                out.append(f"{names[i]}: p50 {v[n // 2] / 1000:.2f} us  p90 {v[n * 9 // 10] / 1000:.2f}  n {probe_n[i]}")
        with open(f"/tmp/stepmesh-probe/{os.getpid()}.txt", "w") as f:
            f.write("\\n".join(out) + "\\n")
    except Exception:
        pass

cdef inline uint64_t now_ns() noexcept nogil:''')
# worker push_pull
rep('''        """Match the signature and post the call: its handle (> 0), or ``-Result`` (NO_PLAN, LIMIT, CLOSED)."""
''', '''        """Match the signature and post the call: its handle (> 0), or ``-Result`` (NO_PLAN, LIMIT, CLOSED)."""
        cdef uint64_t _p0 = now_ns()
''')
rep('''        return self._post(p, lpush, lpull)
''', '''        probe(1, _p0)
        _r = self._post(p, lpush, lpull)
        probe(0, _p0)
        return _r
''')
rep('''        if p.device >= 0 and (p.need_event or p.n_inline_device):
            dev_enter(p.device)''', '''        cdef uint64_t _p0 = now_ns()
        if p.device >= 0 and (p.need_event or p.n_inline_device):
            dev_enter(p.device)''')
rep('''        self.calls[c.handle] = c
        if c.event != NULL or self.deferred:''', '''        probe(2, _p0)
        self.calls[c.handle] = c
        if c.event != NULL or self.deferred:''')
rep('''        c.sends.clear()
        for s in range(p.n_servers):
            c.sends.add(ucp.send_raw(p.eps[s], c.header, p.hlen, p.req_tag | bits, False))''', '''        c.sends.clear()
        cdef uint64_t _p0 = now_ns(), _p1
        for s in range(p.n_servers):
            _p1 = now_ns()
            c.sends.add(ucp.send_raw(p.eps[s], c.header, p.hlen, p.req_tag | bits, False))
            probe(4, _p1)''')
rep('''        c.t_sent = now_ns()
        c.state = C_POSTED''', '''        probe(3, _p0)
        c.t_sent = now_ns()
        c.state = C_POSTED''')
rep('''        cdef Call c = <Call>found
        cdef uint64_t i = 0
        cdef unsigned moved
        cdef bint done = self._settled(c)''', '''        cdef Call c = <Call>found
        cdef uint64_t i = 0
        cdef unsigned moved
        cdef uint64_t _p0 = now_ns()
        cdef bint done = self._settled(c)''')
rep('''        if not done:
            return R_PENDING
        return self._finish(c)''', '''        if not done:
            return R_PENDING
        probe(5, _p0)
        _p0 = now_ns()
        _r = self._finish(c)
        probe(6, _p0)
        return _r''')
# server
rep("    cdef uint64_t t_recv, t_proc\n", "    cdef uint64_t t_recv, t_proc, t_take\n")
rep('''    cdef int _take(self, int w, int k) except -1:
        cdef uint8_t *buf = self.slots[w * RING_DEPTH + k]''', '''    cdef int _take(self, int w, int k) except -1:
        cdef uint64_t _p0 = now_ns()
        _r = self._take2(w, k)
        if _r == R_DONE:
            probe(7, _p0)
        return _r

    cdef int _take2(self, int w, int k) except -1:
        cdef uint8_t *buf = self.slots[w * RING_DEPTH + k]''')
rep('''        r.ops.clear()
        cdef uint64_t bits = self.push_tag[w]''', '''        r.ops.clear()
        r.t_take = now_ns()
        cdef uint64_t bits = self.push_tag[w]''')
rep('''                    r.t_recv = now_ns()
                    (<list>self.ready[r.worker]).append(r)''', '''                    r.t_recv = now_ns()
                    probe_v(8, r.t_recv - r.t_take)
                    (<list>self.ready[r.worker]).append(r)''')
rep('''        del self.handles[handle]
        self._answer(r, out, ts, need_event is not False)
        return R_DONE''', '''        del self.handles[handle]
        _p1 = now_ns()
        self._answer(r, out, ts, need_event is not False)
        probe(12, _p1)
        probe(9, _p0)
        return R_DONE''')
rep('''        cdef object found = self.handles.get(handle)
        if found is None:
            return R_UNKNOWN
        cdef Req r = <Req>found
        cdef Layout lay = r.layout
        if type(tensors) is not list''', '''        cdef uint64_t _p0 = now_ns()
        cdef object found = self.handles.get(handle)
        if found is None:
            return R_UNKNOWN
        cdef Req r = <Req>found
        cdef Layout lay = r.layout
        if type(tensors) is not list''')
rep('''                    idle = drv.stream_query(current_stream(dev)) == DRV_SUCCESS''', '''                    _p0 = now_ns()
                    idle = drv.stream_query(current_stream(dev)) == DRV_SUCCESS
                    probe(10, _p0)''')
rep('''        cdef uint64_t ptr, n, dst
        cdef uint64_t *sizes = out.sizes''', '''        cdef uint64_t ptr, n, dst, _p0
        cdef uint64_t *sizes = out.sizes''')
rep("    cdef void _post_answer(self, Sending out) noexcept:\n", """    cdef void _post_answer(self, Sending out) noexcept:
        cdef uint64_t _t = now_ns()
        self._post_answer2(out)
        probe(11, _t)

    cdef void _post_answer2(self, Sending out) noexcept:
""")
with open(p, "w") as fh:
    fh.write(s)
subprocess.run([sys.executable, f"{dst}/src/stepmesh/data/wire.py", f"{dst}/src/stepmesh/_core/wire.pxi"], check=True)
subprocess.run([sys.executable, "-m", "cython", "-3", p, "-o", p[:-4] + ".c"], check=True)
link = f"{dst}/src/stepmesh/cli"
if not os.path.lexists(link):
    os.symlink(os.path.relpath(f"{root}/cli", os.path.dirname(link)), link)
print(f"probe build in {dst}/src: PYTHONPATH={dst}/src, then read /tmp/stepmesh-probe/*.txt")
