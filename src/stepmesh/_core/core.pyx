# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True, freethreading_compatible=False
"""The data path's steady state: the one implementation of push_pull, wait, get_batch and respond.

Python (``stepmesh.data``) validates arguments, plans a new call signature or
request layout, and words errors; this module owns everything in flight and
answers with :class:`stepmesh.data.wire.Result` codes. It never calls back into
stepmesh's modules and shares no mutable container with them.

libucp and the CUDA driver (or HIP) are bound at run time: the libucp that ucxx
loaded (``bind_ucp``), and ``libcuda.so.1`` the first time device memory shows
up (``bind_device``). Nothing here links against UCX or CUDA, so one build runs
with any UCX 1.10+ and with or without a GPU.

Device ordering lives here too: a device send is posted only once the work
queued on the caller's current stream before the call has completed (an event,
or nothing when the stream is idle). An answer that is a message of its own is
lent (sent from the caller's memory, ``respond`` waiting until the worker took
it) when that stream is idle or without ``need_event``, and staged (copied on
that stream, ``respond`` returning at once) while the stream still has work.
"""

include "wire.pxi"

cimport cython
from cpython.exc cimport PyErr_Clear
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.stdint cimport int16_t, int32_t, int64_t, intptr_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)
from libc.string cimport memcmp, memcpy, memset

from stepmesh.errors import TransportError

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD
    int RTLD_GLOBAL

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

# ------------------------------------------------------------------- libucp
ctypedef void *(*send_fn)(void *ep, const void *buf, size_t count, uint64_t tag, const void *param) noexcept nogil
ctypedef void *(*recv_fn)(void *worker, void *buf, size_t count, uint64_t tag, uint64_t mask,
                          const void *param) noexcept nogil
ctypedef signed char (*check_fn)(void *req) noexcept nogil  # ucs_status_t: a packed (1-byte) enum
ctypedef void (*free_fn)(void *req) noexcept nogil
ctypedef void (*cancel_fn)(void *worker, void *req) noexcept nogil
ctypedef unsigned (*progress_fn)(void *worker) noexcept nogil
ctypedef const char *(*status_string_fn)(int status) noexcept nogil

ctypedef signed char (*mem_map_fn)(void *context, const void *params, void **memh) noexcept nogil  # likewise
ctypedef signed char (*mem_unmap_fn)(void *context, void *memh) noexcept nogil
ctypedef signed char (*rkey_pack_fn)(void *context, void *memh, void **buf, size_t *size) noexcept nogil
ctypedef void (*rkey_release_fn)(void *buf) noexcept nogil
ctypedef signed char (*rkey_unpack_fn)(void *ep, const void *buf, void **rkey) noexcept nogil
ctypedef void (*rkey_destroy_fn)(void *rkey) noexcept nogil
ctypedef void *(*put_fn)(void *ep, const void *buf, size_t count, uint64_t raddr, void *rkey,
                        const void *param) noexcept nogil
ctypedef void *(*flush_fn)(void *ep, const void *param) noexcept nogil
cdef send_fn ucp_send = NULL
cdef mem_map_fn ucp_mem_map = NULL
cdef mem_unmap_fn ucp_mem_unmap = NULL
cdef rkey_pack_fn ucp_rkey_pack = NULL  # the one-sided calls (written answers); NULL: UCX lacks them, none written
cdef rkey_release_fn ucp_rkey_buffer_release = NULL
cdef rkey_unpack_fn ucp_ep_rkey_unpack = NULL
cdef rkey_destroy_fn ucp_rkey_destroy = NULL
cdef put_fn ucp_put_nbx = NULL
cdef flush_fn ucp_ep_flush_nbx = NULL
cdef recv_fn ucp_recv = NULL
cdef check_fn ucp_check = NULL
cdef free_fn ucp_free = NULL
cdef cancel_fn ucp_cancel = NULL
cdef progress_fn ucp_progress = NULL
cdef status_string_fn ucs_status_string = NULL

cdef enum:
    UCS_OK = 0
    UCS_INPROGRESS = 1
    UCS_ERR_CANCELED = -16
    PARAM_WORDS = 16  # ucp_request_param_t is 72 bytes on LP64 (UCX 1.21); zeros past it
    FIELD_DATATYPE = 1 << 3  # UCP_OP_ATTR_FIELD_DATATYPE
    FIELD_MEMORY_TYPE = 1 << 6  # UCP_OP_ATTR_FIELD_MEMORY_TYPE
    FIELD_MEMH = 1 << 8  # UCP_OP_ATTR_FIELD_MEMH (the handle is the param's word 8, offset 64)
    MAP_FIELDS = 3  # UCP_MEM_MAP_PARAM_FIELD_ADDRESS | LENGTH (ucp_mem_map_params_t: mask, address, length, ...)
    DATATYPE_IOV = 2  # UCP_DATATYPE_IOV
    TABLE = 512  # remembered plans per worker (direct-mapped by hash)
    LAYOUTS = 256  # remembered request layouts per worker, on a server
    ANSWER_MAPS = 4  # mappings tried per answer of a layout for the device memory answers are lent from
    REMAKE_LIMIT = 64  # plans a worker makes anew for changed allocations before it stops mapping new ones
    MAX_DEVICES = 64

cdef uintptr_t ERR_MIN = <uintptr_t>-256  # pointers at or above this are UCS_PTR_STATUS(errors)
cdef uint64_t FULL_MASK = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t MOVED = (<uint64_t>1) << ANSWER_MOVED_BIT  # a written answer's size: sent as a message instead

# ucp_request_param_t for each (iov, wire.MemHint: HINT_DETECT, HINT_HOST, HINT_CUDA): op_attr_mask (uint32 at
# offset 0), datatype (offset 24), memory_type (ucs_memory_type_t at offset 48: UCS_MEMORY_TYPE_HOST 0,
# UCS_MEMORY_TYPE_CUDA 1)
cdef uint64_t PARAMS[6][PARAM_WORDS]
memset(PARAMS, 0, sizeof(PARAMS))
cdef int _iov, _mem
for _iov in range(2):
    for _mem in range(3):
        PARAMS[3 * _iov + _mem][0] = (FIELD_DATATYPE if _iov else 0) | (FIELD_MEMORY_TYPE if _mem else 0)
        PARAMS[3 * _iov + _mem][3] = DATATYPE_IOV if _iov else 0
        PARAMS[3 * _iov + _mem][6] = 1 if _mem == HINT_CUDA else 0

cdef inline bint puts_bound() noexcept nogil:
    """Whether UCX has the one-sided calls a server writes answers with (unpack a key, put, flush, destroy)."""
    return ucp_ep_rkey_unpack != NULL and ucp_put_nbx != NULL and ucp_ep_flush_nbx != NULL and ucp_rkey_destroy != NULL


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


def status_text(int status):
    """UCX's text for a ``ucs_status_t``."""
    if ucs_status_string == NULL:
        return f"status {status}"
    cdef const char *s = ucs_status_string(status)
    return f"{(<bytes>s).decode() if s != NULL else 'unknown status'} ({status})"


def bind_ucp(str path):
    """Bind the libucp already loaded by ucxx at ``path`` (RTLD_NOLOAD: never a second copy).

    Raises:
        ImportError: the library is not loaded, or lacks a function (UCX older than 1.10).
    """
    global ucp_send, ucp_recv, ucp_check, ucp_free, ucp_cancel, ucp_progress, ucs_status_string
    global ucp_mem_map, ucp_mem_unmap, ucp_rkey_pack, ucp_rkey_buffer_release, ucp_ep_rkey_unpack, ucp_rkey_destroy
    global ucp_put_nbx, ucp_ep_flush_nbx
    cdef bytes p = path.encode()
    cdef void *lib = dlopen(p, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        raise ImportError(f"libucp is not loaded from {path}: import ucxx first")
    names = (b"ucp_tag_send_nbx", b"ucp_tag_recv_nbx", b"ucp_request_check_status", b"ucp_request_free",
             b"ucp_request_cancel", b"ucp_worker_progress", b"ucs_status_string")
    cdef void *fns[7]
    cdef int i
    for i in range(7):
        fns[i] = dlsym(lib, <const char *>names[i])
        if fns[i] == NULL:
            raise ImportError(f"the libucp at {path} has no {names[i].decode()}: stepmesh needs UCX 1.10 or newer")
    ucp_send = <send_fn>fns[0]
    ucp_mem_map = <mem_map_fn>dlsym(lib, b"ucp_mem_map")
    ucp_mem_unmap = <mem_unmap_fn>dlsym(lib, b"ucp_mem_unmap")
    ucp_rkey_pack = <rkey_pack_fn>dlsym(lib, b"ucp_rkey_pack")
    ucp_rkey_buffer_release = <rkey_release_fn>dlsym(lib, b"ucp_rkey_buffer_release")
    ucp_ep_rkey_unpack = <rkey_unpack_fn>dlsym(lib, b"ucp_ep_rkey_unpack")
    ucp_rkey_destroy = <rkey_destroy_fn>dlsym(lib, b"ucp_rkey_destroy")
    ucp_put_nbx = <put_fn>dlsym(lib, b"ucp_put_nbx")
    ucp_ep_flush_nbx = <flush_fn>dlsym(lib, b"ucp_ep_flush_nbx")
    ucp_recv = <recv_fn>fns[1]
    ucp_check = <check_fn>fns[2]
    ucp_free = <free_fn>fns[3]
    ucp_cancel = <cancel_fn>fns[4]
    ucp_progress = <progress_fn>fns[5]
    ucs_status_string = <status_string_fn>fns[6]


# ------------------------------------------------------- the device driver
ctypedef int (*d_query_fn)(void *) noexcept nogil
ctypedef int (*d_event_create_fn)(void **, unsigned) noexcept nogil
ctypedef int (*d_event_record_fn)(void *, void *) noexcept nogil
ctypedef int (*d_d2h_fn)(void *dst, uint64_t src, size_t n, void *stream) noexcept nogil
ctypedef int (*d_h2d_fn)(uint64_t dst, const void *src, size_t n, void *stream) noexcept nogil
ctypedef int (*d_d2d_fn)(uint64_t dst, uint64_t src, size_t n, void *stream) noexcept nogil
ctypedef int (*d_stream_create_fn)(void **, unsigned) noexcept nogil
ctypedef int (*d_host_alloc_fn)(void **, size_t, unsigned) noexcept nogil
ctypedef int (*d_ptr_fn)(void *) noexcept nogil
ctypedef int (*d_mem_alloc_fn)(uint64_t *, size_t) noexcept nogil
ctypedef int (*d_mem_free_fn)(uint64_t) noexcept nogil
ctypedef int (*d_ctx_get_fn)(void **) noexcept nogil
ctypedef int (*d_retain_fn)(void **, int) noexcept nogil
ctypedef int (*d_device_get_fn)(int *, int) noexcept nogil
ctypedef int (*d_init_fn)(unsigned) noexcept nogil
ctypedef int (*d_error_name_fn)(int, const char **) noexcept nogil
ctypedef const char *(*d_hip_error_fn)(int) noexcept nogil
ctypedef int (*d_set_device_fn)(int) noexcept nogil
ctypedef int (*d_get_device_fn)(int *) noexcept nogil
ctypedef int (*d_ptr_attr_fn)(void *, int, uint64_t) noexcept nogil

cdef struct Driver:
    int kind  # 0: not bound, 1: CUDA driver, 2: HIP
    d_query_fn stream_query
    d_event_create_fn event_create
    d_event_record_fn event_record
    d_query_fn event_query
    d_d2h_fn d2h
    d_h2d_fn h2d
    d_d2d_fn d2d
    d_query_fn stream_sync
    d_stream_create_fn stream_create
    d_host_alloc_fn host_alloc
    d_ptr_fn host_free
    d_mem_alloc_fn mem_alloc
    d_mem_free_fn mem_free
    d_ctx_get_fn ctx_get
    d_query_fn ctx_set
    d_retain_fn primary_retain
    d_device_get_fn device_get
    d_error_name_fn error_name
    d_hip_error_fn hip_error
    d_set_device_fn set_device
    d_get_device_fn get_device
    d_ptr_attr_fn ptr_attr  # CUDA: cuPointerGetAttribute (an allocation's buffer id); HIP: not bound

cdef Driver drv
memset(&drv, 0, sizeof(Driver))
cdef void *dev_ctx[MAX_DEVICES]  # each device's primary context (CUDA)
cdef void *dev_stream_[MAX_DEVICES]  # the core's own stream on each device (non-blocking)
cdef list dev_events = [[] for _ in range(MAX_DEVICES)]  # idle events of each device, as ints
memset(dev_ctx, 0, sizeof(dev_ctx))
memset(dev_stream_, 0, sizeof(dev_stream_))
cdef object raw_stream = None  # torch's _cuda_getCurrentRawStream(device) -> int

cdef enum:
    DRV_SUCCESS = 0
    DRV_NOT_READY = 600  # CUDA_ERROR_NOT_READY, hipErrorNotReady
    STREAM_NON_BLOCKING = 1
    EVENT_DISABLE_TIMING = 2
    HOST_ALLOC_PORTABLE = 1
    PTR_BUFFER_ID = 7  # CU_POINTER_ATTRIBUTE_BUFFER_ID: unique to an allocation for the process's lifetime


cdef void *_sym(void *lib, str name, list missing):
    cdef bytes b = name.encode()
    cdef void *f = dlsym(lib, <const char *>b)
    if f == NULL:
        missing.append(name)
    return f


def bind_device(str kind, object current_raw_stream):
    """Bind the CUDA driver (``kind="cuda"``) or HIP (``"hip"``), and torch's current-stream getter.

    Idempotent. Raises:
        TransportError: the library or one of its functions is missing, or it fails to initialise.
    """
    global raw_stream
    if drv.kind:
        raw_stream = current_raw_stream
        return
    cdef void *lib
    cdef list missing = []
    if kind == "cuda":
        lib = dlopen(b"libcuda.so.1", RTLD_NOW | RTLD_GLOBAL)
        if lib == NULL:
            raise TransportError(f"the CUDA driver (libcuda.so.1) cannot be loaded: {(<bytes>dlerror()).decode()}")
        drv.stream_query = <d_query_fn>_sym(lib, "cuStreamQuery", missing)
        drv.event_create = <d_event_create_fn>_sym(lib, "cuEventCreate", missing)
        drv.event_record = <d_event_record_fn>_sym(lib, "cuEventRecord", missing)
        drv.event_query = <d_query_fn>_sym(lib, "cuEventQuery", missing)
        drv.d2h = <d_d2h_fn>_sym(lib, "cuMemcpyDtoHAsync_v2", missing)
        drv.h2d = <d_h2d_fn>_sym(lib, "cuMemcpyHtoDAsync_v2", missing)
        drv.d2d = <d_d2d_fn>_sym(lib, "cuMemcpyDtoDAsync_v2", missing)
        drv.stream_sync = <d_query_fn>_sym(lib, "cuStreamSynchronize", missing)
        drv.stream_create = <d_stream_create_fn>_sym(lib, "cuStreamCreate", missing)
        drv.host_alloc = <d_host_alloc_fn>_sym(lib, "cuMemHostAlloc", missing)
        drv.host_free = <d_ptr_fn>_sym(lib, "cuMemFreeHost", missing)
        drv.mem_alloc = <d_mem_alloc_fn>_sym(lib, "cuMemAlloc_v2", missing)
        drv.mem_free = <d_mem_free_fn>_sym(lib, "cuMemFree_v2", missing)
        drv.ctx_get = <d_ctx_get_fn>_sym(lib, "cuCtxGetCurrent", missing)
        drv.ctx_set = <d_query_fn>_sym(lib, "cuCtxSetCurrent", missing)
        drv.primary_retain = <d_retain_fn>_sym(lib, "cuDevicePrimaryCtxRetain", missing)
        drv.device_get = <d_device_get_fn>_sym(lib, "cuDeviceGet", missing)
        drv.error_name = <d_error_name_fn>_sym(lib, "cuGetErrorName", missing)
        drv.ptr_attr = <d_ptr_attr_fn>_sym(lib, "cuPointerGetAttribute", missing)
        init = <d_init_fn>_sym(lib, "cuInit", missing)
        if missing:
            raise TransportError(f"the CUDA driver lacks {', '.join(missing)}")
        _drv_check(init(0), "cuInit")
        drv.kind = 1
    elif kind == "hip":
        lib = dlopen(b"libamdhip64.so", RTLD_NOW | RTLD_GLOBAL)
        if lib == NULL:
            raise TransportError(f"HIP (libamdhip64.so) cannot be loaded: {(<bytes>dlerror()).decode()}")
        drv.stream_query = <d_query_fn>_sym(lib, "hipStreamQuery", missing)
        drv.event_create = <d_event_create_fn>_sym(lib, "hipEventCreateWithFlags", missing)
        drv.event_record = <d_event_record_fn>_sym(lib, "hipEventRecord", missing)
        drv.event_query = <d_query_fn>_sym(lib, "hipEventQuery", missing)
        drv.d2h = <d_d2h_fn>_sym(lib, "hipMemcpyDtoHAsync", missing)
        drv.h2d = <d_h2d_fn>_sym(lib, "hipMemcpyHtoDAsync", missing)
        drv.d2d = <d_d2d_fn>_sym(lib, "hipMemcpyDtoDAsync", missing)
        drv.stream_sync = <d_query_fn>_sym(lib, "hipStreamSynchronize", missing)
        drv.stream_create = <d_stream_create_fn>_sym(lib, "hipStreamCreateWithFlags", missing)
        drv.host_alloc = <d_host_alloc_fn>_sym(lib, "hipHostMalloc", missing)
        drv.host_free = <d_ptr_fn>_sym(lib, "hipHostFree", missing)
        drv.mem_alloc = <d_mem_alloc_fn>_sym(lib, "hipMalloc", missing)
        drv.mem_free = <d_mem_free_fn>_sym(lib, "hipFree", missing)
        drv.hip_error = <d_hip_error_fn>_sym(lib, "hipGetErrorName", missing)
        drv.set_device = <d_set_device_fn>_sym(lib, "hipSetDevice", missing)
        drv.get_device = <d_get_device_fn>_sym(lib, "hipGetDevice", missing)
        if missing:
            raise TransportError(f"HIP lacks {', '.join(missing)}")
        drv.kind = 2
    else:
        raise ValueError(f"unknown device kind {kind!r}: expected 'cuda' or 'hip'")
    raw_stream = current_raw_stream


def device_bound():
    """Which device runtime the core is bound to: '' (none yet), 'cuda' or 'hip'."""
    return ("", "cuda", "hip")[drv.kind]


cdef str _drv_error(int rc):
    cdef const char *name = NULL
    if drv.kind == 1 and drv.error_name != NULL:
        drv.error_name(rc, &name)
    elif drv.kind == 2 and drv.hip_error != NULL:
        name = drv.hip_error(rc)
    return f"{(<bytes>name).decode() if name != NULL else 'error'} ({rc})"


cdef int _drv_check(int rc, str what) except -1:
    if rc != DRV_SUCCESS:
        raise TransportError(f"{what} failed: {_drv_error(rc)}")
    return 0


cdef int dev_enter(int index) except -1:
    """Make ``index`` the calling thread's current device (the primary context torch uses)."""
    cdef void *cur = NULL
    cdef int d = 0
    if index < 0 or index >= MAX_DEVICES:
        raise TransportError(f"device index {index} is out of range")
    if drv.kind == 0:
        raise TransportError("device memory, but the core has no device runtime bound (bind_device)")
    if drv.kind == 2:
        _drv_check(drv.get_device(&d), "hipGetDevice")
        if d != index:
            _drv_check(drv.set_device(index), "hipSetDevice")
        return 0
    if dev_ctx[index] == NULL:
        _drv_check(drv.device_get(&d, index), "cuDeviceGet")
        _drv_check(drv.primary_retain(&dev_ctx[index], d), "cuDevicePrimaryCtxRetain")
    _drv_check(drv.ctx_get(&cur), "cuCtxGetCurrent")
    if cur != dev_ctx[index]:
        _drv_check(drv.ctx_set(dev_ctx[index]), "cuCtxSetCurrent")
    return 0


cdef void *core_stream(int index) except NULL:
    """The core's own (non-blocking) stream on device ``index`` (current already)."""
    if dev_stream_[index] == NULL:
        _drv_check(drv.stream_create(&dev_stream_[index], STREAM_NON_BLOCKING), "creating a stream")
    return dev_stream_[index]


cdef int stream_via_dl = 0  # 0: not yet checked, 1: torch's DLPack current_work_stream, -1: its Python getter


cdef void *current_stream(int index) except? NULL:
    """The caller's current stream on device ``index`` (torch's): through DLPack when it gives what the Python
    getter gives (checked once)."""
    global stream_via_dl
    cdef void *s = NULL
    cdef int32_t kind = DL_CUDA if drv.kind == 1 else DL_ROCM
    if stream_via_dl > 0:
        if dl_stream(kind, index, &s) != 0:
            raise TransportError(f"torch gave no current stream for device {index}")
        return s
    cdef uintptr_t py = raw_stream(index)
    if stream_via_dl == 0:
        stream_via_dl = -1
        if dl_stream != NULL:
            if dl_stream(kind, index, &s) == 0 and <uintptr_t>s == py:
                stream_via_dl = 1
            else:
                PyErr_Clear()
    return <void *>py


cdef void *event_take(int index) except NULL:
    cdef list idle = dev_events[index]
    cdef void *ev = NULL
    if idle:
        return <void *><uintptr_t>idle.pop()
    _drv_check(drv.event_create(&ev, EVENT_DISABLE_TIMING), "creating an event")
    return ev


cdef inline void event_give(int index, void *ev):
    (<list>dev_events[index]).append(<uintptr_t>ev)


cdef int sync_core_stream(int index) except -1:
    _drv_check(drv.stream_sync(core_stream(index)), "synchronising the core's stream")
    return 0


cdef inline uint64_t buffer_id(uint64_t ptr) noexcept:
    """The id of the CUDA allocation behind ``ptr`` (0: none known). A mapping made for an address holds while
    the id is the same: memory freed and allocated again at that address gets a new one."""
    cdef uint64_t bid = 0
    if drv.kind != 1 or drv.ptr_attr == NULL or drv.ptr_attr(&bid, PTR_BUFFER_ID, ptr) != DRV_SUCCESS:
        return 0
    return bid


# ---------------------------------------------------------------- memory
cdef enum MemKind:
    MEM_HOST = 0
    MEM_PINNED = 1
    MEM_DEVICE = 2


cdef void *mem_get(int kind, size_t size, int device) except NULL:
    cdef void *p = NULL
    cdef uint64_t d = 0
    if size == 0:
        size = 1
    if kind == MEM_HOST:
        if posix_memalign(&p, 64, size) != 0:
            raise MemoryError()
        return p
    dev_enter(device)
    if kind == MEM_PINNED:
        _drv_check(drv.host_alloc(&p, size, HOST_ALLOC_PORTABLE), f"allocating {size} bytes of pinned memory")
        return p
    _drv_check(drv.mem_alloc(&d, size), f"allocating {size} bytes of device memory")
    return <void *><uintptr_t>d


cdef void mem_put(int kind, void *p, int device) noexcept:
    if p == NULL:
        return
    if kind == MEM_HOST:
        free(p)
    elif kind == MEM_PINNED:
        drv.host_free(p)
    else:
        drv.mem_free(<uint64_t><uintptr_t>p)


cdef class Pool:
    """Buffers of one size and kind, recycled (a few kept; the rest freed)."""

    cdef size_t size
    cdef int kind, device, n, cap
    cdef void **free_

    def __cinit__(self, size_t size, int kind, int device=-1, int keep=16):
        self.size = size
        self.kind = kind
        self.device = device
        self.cap = keep
        self.n = 0
        self.free_ = <void **>calloc(keep, sizeof(void *))
        if self.free_ == NULL:
            raise MemoryError()

    cdef void *get(self) except NULL:
        if self.n:
            self.n -= 1
            return self.free_[self.n]
        return mem_get(self.kind, self.size, self.device)

    cdef void put(self, void *p) noexcept:
        if self.n < self.cap:
            self.free_[self.n] = p
            self.n += 1
        else:
            mem_put(self.kind, p, self.device)

    def __dealloc__(self):
        cdef int i
        for i in range(self.n):
            mem_put(self.kind, self.free_[i], self.device)
        free(self.free_)


# ------------------------------------------------------------ tag operations
@cython.no_gc_clear
@cython.final
cdef class MemMap:
    """A buffer mapped with ``ucp_mem_map`` on one context (``Ucp.map``): operations on it pass the handle, from
    which UCX takes the memory type instead of looking the address up. Unmapped when it goes; it keeps the
    context and the buffer's owner alive until then."""

    cdef void *ctx
    cdef void *memh
    cdef object keep
    cdef uint64_t param[PARAM_WORDS]  # ucp_request_param_t: op_attr_mask FIELD_MEMH, memh (word 8)

    def __dealloc__(self):
        if self.memh != NULL:
            ucp_mem_unmap(self.ctx, self.memh)

    cdef void leave_to_ucx(self):
        """Never unmap: a receive abandoned in flight may still use the handle, the buffer and the context."""
        if self.memh != NULL:
            _LEFT_TO_UCX.append(self.keep)
            self.memh = NULL


cdef list _LEFT_TO_UCX = []  # what abandoned operations may still use: mappings' contexts, tensors (kept to the end)


cdef class Ucp:
    """libucp's tag calls on one ucxx worker and its lane: ``Ucp(worker, handle, release_gil, lane, lane_handle)``.

    The worker objects are kept alive; ``release_gil`` lets go of the GIL around
    every UCX call (other threads, ucxx's progress threads, progress the workers).
    The lane, a second worker for small device messages, is optional (handle 0);
    progress moves both, and receives are posted on the lane only when asked.
    """

    cdef void *worker
    cdef void *lane
    cdef void *ctx  # the worker's and the lane's ucp_context_h (NULL: not given, nothing is mapped)
    cdef void *lane_ctx
    cdef object worker_obj, lane_obj, ctx_obj, lane_ctx_obj
    cdef bint release_gil
    cdef int hints  # the highest MemHint told to UCX; above it, UCX detects
    cdef set live  # Request objects handed out and still in flight
    cdef bint closed

    def __cinit__(self, object worker_obj, uintptr_t handle, bint release_gil=False, object lane_obj=None,
                  uintptr_t lane_handle=0, int hints=HINT_DETECT, object context_obj=None,
                  object lane_context_obj=None):
        if ucp_send == NULL:
            raise TransportError("stepmesh._core: bind_ucp() was not called")
        if not HINT_DETECT <= hints <= HINT_CUDA:
            raise ValueError(f"Ucp: hints must be a wire.MemHint, got {hints}")
        self.hints = hints
        self.worker_obj = worker_obj
        self.worker = <void *>handle
        self.lane_obj = lane_obj
        self.lane = <void *>lane_handle
        self.ctx_obj = context_obj
        self.lane_ctx_obj = lane_context_obj
        self.ctx = <void *><uintptr_t>context_obj.handle if context_obj is not None else NULL
        self.lane_ctx = <void *><uintptr_t>lane_context_obj.handle if lane_context_obj is not None else NULL
        self.release_gil = release_gil
        self.live = set()

    cdef inline const void *param(self, bint iov, int mem) noexcept:
        if mem > self.hints or mem < HINT_DETECT or (mem == HINT_CUDA and drv.kind != 1):
            mem = HINT_DETECT
        return <const void *>&PARAMS[3 * iov + mem][0]

    cdef inline const void *mapped_or(self, const void *mapped, bint device) noexcept:
        """A buffer's parameter block: its mapping's (``MemMap.param``) when it has one, else its memory type's."""
        return mapped if mapped != NULL else self.param(False, HINT_CUDA if device else HINT_HOST)

    cdef inline void *send_raw(self, uint64_t ep, const void *buf, size_t n, uint64_t tag, bint iov,
                               int mem) noexcept:
        return self.send_param(ep, buf, n, tag, self.param(iov, mem))

    cdef inline void *send_param(self, uint64_t ep, const void *buf, size_t n, uint64_t tag,
                                 const void *param) noexcept:
        cdef void *h
        if self.release_gil:
            with nogil:
                h = ucp_send(<void *><uintptr_t>ep, buf, n, tag, param)
        else:
            h = ucp_send(<void *><uintptr_t>ep, buf, n, tag, param)
        return h

    cdef inline void *recv_raw(self, void *buf, size_t n, uint64_t tag, uint64_t mask, bint iov, int mem,
                               bint on_lane=False) noexcept:
        return self.recv_param(buf, n, tag, mask, self.param(iov, mem), on_lane)

    cdef inline void *recv_param(self, void *buf, size_t n, uint64_t tag, uint64_t mask, const void *param,
                                 bint on_lane) noexcept:
        cdef void *h
        cdef void *worker = self.lane if on_lane else self.worker
        if self.release_gil:
            with nogil:
                h = ucp_recv(worker, buf, n, tag, mask, param)
        else:
            h = ucp_recv(worker, buf, n, tag, mask, param)
        return h

    cdef inline int poll_raw(self, void *h) noexcept:
        """UCS_INPROGRESS, or the final status (the request is then freed)."""
        cdef int s
        if self.release_gil:
            with nogil:
                s = ucp_check(h)
                if s != UCS_INPROGRESS:
                    ucp_free(h)
        else:
            s = ucp_check(h)
            if s != UCS_INPROGRESS:
                ucp_free(h)
        return s

    cdef inline bint maps(self) noexcept:
        """Whether ``map`` maps: hints all, the contexts given, and no progress thread (ucxx makes the contexts
        without a lock, and ucp_mem_map would race the thread on them)."""
        return self.hints >= HINT_CUDA and self.ctx != NULL and ucp_mem_map != NULL and ucp_mem_unmap != NULL \
            and not self.release_gil

    cdef MemMap map(self, uint64_t ptr, uint64_t nbytes, bint on_lane, object owner):
        """``ptr``..``ptr + nbytes`` mapped on the worker's context (the lane's: ``on_lane``) when this Ucp names
        device memory (``hints`` all) and was given its contexts; None otherwise, or where UCX cannot map it (the
        buffer is then looked up per operation, as before; always in ``thread`` progress mode, where ucp_mem_map
        would race the progress thread on the context). ``owner`` is kept alive with the mapping."""
        cdef void *ctx = self.lane_ctx if on_lane else self.ctx
        cdef uint64_t mp[8]
        if not self.maps() or ctx == NULL or nbytes == 0:
            return None
        memset(mp, 0, sizeof(mp))
        mp[0] = MAP_FIELDS
        mp[1] = ptr
        mp[2] = nbytes
        cdef MemMap m = MemMap.__new__(MemMap)
        cdef void *memh = NULL
        if ucp_mem_map(ctx, mp, &memh) != UCS_OK or memh == NULL:
            return None
        m.ctx = ctx
        m.memh = memh
        m.keep = (self.lane_ctx_obj if on_lane else self.ctx_obj, owner)
        memset(m.param, 0, sizeof(m.param))
        m.param[0] = FIELD_MEMH
        m.param[8] = <uintptr_t>memh
        return m

    cdef inline bint writes(self) noexcept:
        """Whether answers may be written one-sided into this side's memory: it maps (``maps``) and UCX has the
        one-sided calls, those that pack keys as well as those that put."""
        return self.maps() and ucp_rkey_pack != NULL and ucp_rkey_buffer_release != NULL and puts_bound()

    def pack_rkey(self, uintptr_t ptr, uint64_t nbytes, bint device):
        """Map ``ptr``..``ptr + nbytes`` on the worker's context and pack a remote key for it, for a server to write
        an answer there: ``(mapping, key bytes, allocation id)``, or None where this side does not write (see
        ``writes``), UCX refuses, or a device buffer's allocation cannot be told (its id is 0: a mapping that
        outlived its allocation could not be noticed). Keep the mapping as long as the key is in use."""
        cdef void *buf = NULL
        cdef size_t size = 0
        cdef uint64_t bid = 0
        if not self.writes() or nbytes == 0 or (device and drv.kind != 1):
            return None
        if device:
            bid = buffer_id(ptr)
            if bid == 0:
                return None
        cdef MemMap m = self.map(ptr, nbytes, False, None)
        if m is None:
            return None
        if ucp_rkey_pack(self.ctx, m.memh, &buf, &size) != UCS_OK or buf == NULL:
            return None
        cdef bytes key = (<char *>buf)[:size]
        ucp_rkey_buffer_release(buf)
        return m, key, bid

    cdef void *unpack_rkey(self, uint64_t ep, bytes key) noexcept:
        """A remote key unpacked on ``ep`` (``ucp_rkey_destroy`` it), or NULL where UCX refuses or lacks the calls."""
        cdef void *rkey = NULL
        if not puts_bound():
            return NULL
        if ucp_ep_rkey_unpack(<void *><uintptr_t>ep, <const char *>key, &rkey) != UCS_OK:
            return NULL
        return rkey

    cdef inline void *put_param(self, uint64_t ep, const void *buf, size_t n, uint64_t raddr, void *rkey,
                                const void *param) noexcept:
        cdef void *h
        if self.release_gil:
            with nogil:
                h = ucp_put_nbx(<void *><uintptr_t>ep, buf, n, raddr, rkey, param)
        else:
            h = ucp_put_nbx(<void *><uintptr_t>ep, buf, n, raddr, rkey, param)
        return h

    cdef inline void *flush_ep(self, uint64_t ep) noexcept:
        """``ucp_ep_flush_nbx``: done once every operation posted on ``ep`` before it is complete at the peer."""
        cdef void *h
        if self.release_gil:
            with nogil:
                h = ucp_ep_flush_nbx(<void *><uintptr_t>ep, &PARAMS[0][0])
        else:
            h = ucp_ep_flush_nbx(<void *><uintptr_t>ep, &PARAMS[0][0])
        return h

    cdef inline unsigned progress_raw(self) noexcept:
        cdef unsigned n
        if self.release_gil:
            with nogil:
                n = ucp_progress(self.worker)
                if self.lane != NULL:
                    n += ucp_progress(self.lane)
        else:
            n = ucp_progress(self.worker)
            if self.lane != NULL:
                n += ucp_progress(self.lane)
        return n

    cdef inline void cancel_raw(self, void *h, bint on_lane=False) noexcept:
        ucp_cancel(self.lane if on_lane else self.worker, h)

    cdef inline void drain(self) noexcept:
        while self.progress_raw():
            pass

    # Python's view, for the wire-up, tests and the bench's protocol contender
    cdef Request _wrap(self, void *h):
        cdef Request r = Request.__new__(Request)
        r.ucp = self
        if h == NULL:
            return r
        if <uintptr_t>h >= ERR_MIN:
            raise TransportError(f"UCX refused a tag operation: {status_text(<int><intptr_t>h)}")
        r.h = h
        self.live.add(r)
        return r

    def send(self, uintptr_t ep, uintptr_t ptr, size_t nbytes, uint64_t tag, int mem=HINT_DETECT):
        """Send ``nbytes`` at ``ptr`` on the endpoint whose ``ucp_ep_h`` is ``ep``; ``mem``: what the memory is
        known to be (a ``wire.MemHint``), told to UCX up to this Ucp's ``hints``.

        Raises:
            TransportError: UCX refused the send.
        """
        return self._wrap(self.send_raw(ep, <void *>ptr, nbytes, tag, False, mem))

    def recv(self, uintptr_t ptr, size_t nbytes, uint64_t tag, uint64_t mask=0xFFFFFFFFFFFFFFFF, bint lane=False,
             int mem=HINT_DETECT):
        """Receive the next message whose tag matches ``tag`` under ``mask`` into ``ptr`` (on the lane: ``lane``;
        ``mem`` as for :meth:`send`).

        Raises:
            TransportError: UCX refused the receive, or ``lane`` without a lane.
        """
        if lane and self.lane == NULL:
            raise TransportError("Ucp.recv(lane=True): this Ucp has no lane")
        cdef Request r = self._wrap(self.recv_raw(<void *>ptr, nbytes, tag, mask, False, mem, lane))
        r.on_lane = lane
        return r

    @property
    def has_lane(self):
        return self.lane != NULL

    def progress(self):
        """One ``ucp_worker_progress``; non-zero when anything moved."""
        return self.progress_raw()

    def wait(self, list reqs, uint64_t spins):
        """Busy-poll until every request of ``reqs`` is complete, for at most ``spins`` steps; whether they are."""
        cdef uint64_t i
        for i in range(spins + 1):
            if all([(<Request>r).poll() for r in reqs]):
                return True
            if i < spins:
                self.drain()
        return False

    def unpack(self, uintptr_t ep, bytes key):
        """A remote key from ``pack_rkey``'s bytes, unpacked on the endpoint ``ep`` (for :meth:`put`).

        Raises:
            TransportError: UCX refused it, or lacks the one-sided calls.
        """
        cdef void *rkey = self.unpack_rkey(ep, key)
        if rkey == NULL:
            raise TransportError("UCX refused a remote key (or has no one-sided calls)")
        cdef RemoteKey k = RemoteKey.__new__(RemoteKey)
        k.rkey = rkey
        k.ucp = self
        return k

    def put(self, uintptr_t ep, uintptr_t ptr, size_t nbytes, uint64_t raddr, RemoteKey key, int mem=HINT_DETECT):
        """Write ``nbytes`` at ``ptr`` to ``raddr`` in the peer behind ``ep`` through ``key`` (``mem`` as for
        :meth:`send`).

        Raises:
            TransportError: UCX refused the put.
        """
        return self._wrap(self.put_param(ep, <void *>ptr, nbytes, raddr, key.rkey, self.param(False, mem)))

    def flush(self, uintptr_t ep):
        """Complete once everything posted on ``ep`` before it is complete at the peer.

        Raises:
            TransportError: UCX refused the flush.
        """
        return self._wrap(self.flush_ep(ep))

    def cancel(self, Request r):
        """Cancel ``r`` if it is still in flight (it then completes with a cancelled status)."""
        if r.h != NULL:
            self.cancel_raw(r.h, r.on_lane)

    @property
    def in_flight(self):
        return len(self.live)

    def close(self):
        """Cancel and release every Request still in flight (before the worker goes)."""
        self.closed = True
        for r in list(self.live):
            (<Request>r).abandon()
        self.live.clear()


cdef class RemoteKey:
    """A peer's remote key unpacked on one endpoint (``Ucp.unpack``); destroyed with it while its Ucp is open."""

    cdef void *rkey
    cdef Ucp ucp

    def __dealloc__(self):
        if self.rkey != NULL and self.ucp is not None and not self.ucp.closed:
            ucp_rkey_destroy(self.rkey)


cdef class Request:
    """One tag operation of :class:`Ucp`'s Python view; ``completed`` turns True once."""

    cdef void *h
    cdef int status_
    cdef uint64_t t_done_
    cdef Ucp ucp
    cdef bint on_lane

    cdef bint poll(self):
        if self.h == NULL:
            return True
        cdef int s = self.ucp.poll_raw(self.h)
        if s == UCS_INPROGRESS:
            return False
        self.h = NULL
        self.status_ = s
        self.t_done_ = now_ns()
        self.ucp.live.discard(self)
        return True

    cdef void abandon(self):
        if self.h != NULL:
            self.ucp.cancel_raw(self.h, self.on_lane)
            ucp_free(self.h)
            self.h = NULL
            self.status_ = UCS_ERR_CANCELED
            self.t_done_ = now_ns()

    @property
    def completed(self):
        return self.poll()

    @property
    def status(self):
        """Its ``ucs_status_t`` once complete (0: OK)."""
        return self.status_

    @property
    def t_done(self):
        """``time.monotonic_ns()`` when seen complete; 0 when it completed within its call."""
        return self.t_done_

    def check_error(self):
        """Raise if the operation failed.

        Raises:
            TransportError: its UCX status (a truncated or cancelled receive, say).
        """
        if self.status_:
            raise TransportError(f"UCX tag operation failed: {status_text(self.status_)}")


# ------------------------------------------------------------ request sets
cdef class Ops:
    """The UCX requests of one call: posted, polled, each with its final status and when it was seen done."""

    cdef int n, cap
    cdef void **h
    cdef int *status
    cdef uint64_t *t_done
    cdef uint8_t *on_lane  # 1: a receive posted on the lane (cancelled there)

    def __cinit__(self, int cap):
        self.cap = cap if cap > 0 else 1
        self.n = 0
        self.h = <void **>calloc(self.cap, sizeof(void *))
        self.status = <int *>calloc(self.cap, sizeof(int))
        self.t_done = <uint64_t *>calloc(self.cap, sizeof(uint64_t))
        self.on_lane = <uint8_t *>calloc(self.cap, sizeof(uint8_t))
        if self.h == NULL or self.status == NULL or self.t_done == NULL or self.on_lane == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.h)
        free(self.status)
        free(self.t_done)
        free(self.on_lane)

    cdef inline void clear(self) noexcept:
        self.n = 0

    cdef inline void recv(self, Ucp ucp, void *buf, size_t n, uint64_t tag, const void *param,
                          bint on_lane) noexcept:
        """Post a receive of exactly ``tag`` with ``param`` (``Ucp.param`` or a ``MemMap``'s; on the lane when
        ``on_lane``) and record it."""
        self.add(ucp.recv_param(buf, n, tag, FULL_MASK, param, on_lane), on_lane)

    cdef inline void add(self, void *h, bint on_lane=False) noexcept:
        """Record what a post returned: a request, NULL (done within the call) or an error status (``on_lane``:
        a receive posted on the lane, cancelled there)."""
        cdef int i = self.n
        self.n += 1
        self.t_done[i] = 0
        self.on_lane[i] = on_lane
        if h == NULL:
            self.h[i] = NULL
            self.status[i] = UCS_OK
        elif <uintptr_t>h >= ERR_MIN:
            self.h[i] = NULL
            self.status[i] = <int><intptr_t>h
        else:
            self.h[i] = h
            self.status[i] = UCS_INPROGRESS

    cdef inline bint settled(self, Ucp ucp, int lo, int hi) noexcept:
        """Whether requests lo..hi-1 are done (each is looked at: each gets its own t_done)."""
        cdef int i, s
        cdef bint done = True
        for i in range(lo, hi):
            if self.h[i] != NULL:
                s = ucp.poll_raw(self.h[i])
                if s == UCS_INPROGRESS:
                    done = False
                else:
                    self.h[i] = NULL
                    self.status[i] = s
                    self.t_done[i] = now_ns()
        return done

    cdef inline int first_error(self, int lo, int hi) noexcept:
        cdef int i
        for i in range(lo, hi):
            if self.status[i] != UCS_OK and self.status[i] != UCS_INPROGRESS:
                return self.status[i]
        return 0

    cdef bint abandon(self, Ucp ucp) noexcept:
        """Cancel and free whatever is still in flight (the memory they use is left to UCX); whether anything was.

        A receive UCX has already matched runs on after the cancel, so what it uses must stay as it is."""
        cdef int i
        cdef bint any_ = False
        for i in range(self.n):
            if self.h[i] != NULL:
                any_ = True
                ucp.cancel_raw(self.h[i], self.on_lane[i])
                ucp_free(self.h[i])
                self.h[i] = NULL
                self.status[i] = UCS_ERR_CANCELED
        return any_


# ------------------------------------------------------------- tensor facts
# torch's DLPack C exchange API (``torch.Tensor.__dlpack_c_exchange_api__``, DLPack 1.3, torch 2.10 and later): one C
# call gives all of a tensor's facts, and another the current stream; with an older torch, its Python getters.
cdef struct DLTensor:  # DLPack's DLTensor, its DLDevice and DLDataType spelled out
    void *data
    int32_t device_type
    int32_t device_id
    int32_t ndim
    uint8_t code
    uint8_t bits
    uint16_t lanes
    int64_t *shape
    int64_t *strides
    uint64_t byte_offset

ctypedef int (*dl_fill_fn)(void *obj, DLTensor *out) noexcept
ctypedef int (*dl_stream_fn)(int32_t device_type, int32_t device_id, void **out) noexcept

cdef struct DLExchange:  # DLPackExchangeAPI: header (version, prev_api), then its five functions
    uint32_t major, minor
    void *prev_api
    void *allocator
    void *from_py
    void *to_py
    dl_fill_fn fill  # may be NULL
    dl_stream_fn stream

cdef enum:
    DL_CPU = 1
    DL_CUDA = 2
    DL_ROCM = 10
    DL_CODES = 32

cdef object Tensor = None  # torch.Tensor
cdef dict DTYPE_CODE = {}  # torch.dtype -> wire code
cdef object torch_empty = None
cdef dl_fill_fn dl_fill = NULL
cdef dl_stream_fn dl_stream = NULL
cdef int16_t DL_WIRE[DL_CODES][17]  # DLPack (type code, bits / 8) -> wire code + 1; 0: unknown, -1: ambiguous
cdef uint8_t ITEMSIZE[256]  # wire code -> bytes per element
cdef uint8_t IS_COMPLEX[256]  # wire code -> 1: a complex dtype (a conjugated view of one never matches a plan)


def bind_torch(object tensor_type, dict dtype_codes, object empty, bint dlpack=True):
    """torch.Tensor, {dtype: wire code} and torch.empty: what the cores read and make tensors with; ``dlpack``:
    through torch's DLPack C exchange API where it has one (False: its Python getters, as an older torch)."""
    global Tensor, DTYPE_CODE, torch_empty, dl_fill, dl_stream, stream_via_dl
    cdef DLExchange *api = NULL
    cdef DLTensor dl
    cdef int16_t *slot
    Tensor = tensor_type
    DTYPE_CODE = dtype_codes
    torch_empty = empty
    dl_fill = NULL
    dl_stream = NULL
    stream_via_dl = 0
    capsule = getattr(tensor_type, "__dlpack_c_exchange_api__", None) if dlpack else None
    if capsule is not None and PyCapsule_IsValid(capsule, b"dlpack_exchange_api"):
        api = <DLExchange *>PyCapsule_GetPointer(capsule, b"dlpack_exchange_api")
        if api.major == 1 and api.minor >= 3 and api.fill != NULL and api.stream != NULL:
            dl_fill = api.fill
            dl_stream = api.stream
    memset(DL_WIRE, 0, sizeof(DL_WIRE))
    for dtype, code in dtype_codes.items():
        t = empty((1,), dtype=dtype)
        ITEMSIZE[<int>code] = t.element_size()
        IS_COMPLEX[<int>code] = dtype.is_complex
        if dl_fill == NULL:
            continue
        if dl_fill(<void *>t, &dl) != 0:
            PyErr_Clear()
            continue
        slot = dl_wire_slot(&dl)
        if slot != NULL:
            slot[0] = <int16_t>(code + 1) if slot[0] == 0 else -1


def tensor_facts(object t):
    """What the core reads of ``t``: (address, nbytes, wire dtype code, shape, device (-1: host), contiguous,
    conjugated), or None when it is not a tensor of a dtype the wire carries."""
    cdef Fact f
    memset(&f, 0, sizeof(Fact))
    if read_fact(t, &f) < 0:
        return None
    return (f.ptr, f.nbytes, f.code, tuple([f.dims[d] for d in range(f.ndim)]), f.device, bool(f.contig),
            bool(f.conj))


def dlpack_bound():
    """Whether the core reads tensors through torch's DLPack C exchange API (torch 2.10 and later; else through
    torch's Python getters, about 0.3 us a tensor more)."""
    return dl_fill != NULL


cdef struct Fact:
    uint64_t ptr, nbytes
    int code  # the wire code of its dtype
    int ndim
    int device  # -1: host memory
    int contig
    int conj  # 1: a lazily conjugated view (never planned)
    int pad
    int64_t dims[MAX_NDIM]


cdef inline int16_t *dl_wire_slot(DLTensor *dl) noexcept:
    """Where DL_WIRE keeps the wire code of ``dl``'s dtype, or NULL for a dtype it cannot hold (vector lanes, sub-byte
    or over 128 bits, an unknown type code)."""
    if dl.lanes != 1 or dl.code >= DL_CODES or dl.bits % 8 or dl.bits > 128:
        return NULL
    return &DL_WIRE[dl.code][dl.bits >> 3]


cdef inline int dl_fact(object t, Fact *f) noexcept:
    """Read a tensor's facts through DLPack: 0, or -1 when torch's getters must (a Python error cleared)."""
    cdef DLTensor dl
    cdef int d, wire
    cdef int64_t expect = 1, n = 1
    cdef int16_t *slot
    if dl_fill(<void *>t, &dl) != 0:
        PyErr_Clear()
        return -1
    slot = dl_wire_slot(&dl)
    if slot == NULL or dl.ndim > MAX_NDIM:
        return -1
    wire = slot[0] - 1
    if wire < 0:
        return -1
    if dl.device_type == DL_CPU:
        f.device = -1
    elif dl.device_type == DL_CUDA or dl.device_type == DL_ROCM:
        f.device = dl.device_id
    else:
        return -1
    f.ptr = <uint64_t><uintptr_t>dl.data + dl.byte_offset
    f.code = wire
    f.ndim = dl.ndim
    f.contig = 1
    for d in range(dl.ndim - 1, -1, -1):  # as torch's is_contiguous(): row-major, size-1 dims' strides ignored
        f.dims[d] = dl.shape[d]
        n *= dl.shape[d]
        if dl.strides != NULL and dl.shape[d] != 1:
            if dl.strides[d] != expect:
                f.contig = 0
            expect *= dl.shape[d]
    if n == 0:
        f.contig = 1
    f.nbytes = <uint64_t>n * ITEMSIZE[wire]
    return 0


cdef int read_fact(object t, Fact *f) except -2:
    """Read a tensor's facts: 0, or -1 when t is not a plain tensor of a dtype the wire carries.

    A conjugated view (torch's lazy conjugation) is marked, so that it never matches a plan."""
    cdef Py_ssize_t nd, d
    if not isinstance(t, Tensor):
        return -1
    try:
        if dl_fill == NULL or dl_fact(t, f) < 0:
            code = DTYPE_CODE.get(t.dtype)
            if code is None or t.is_meta:
                return -1
            shape = t.shape
            nd = len(shape)
            if nd > MAX_NDIM:
                return -1
            f.ptr = t.data_ptr()
            f.code = code
            f.ndim = <int>nd
            f.device = t.get_device()
            f.contig = t.is_contiguous()
            f.nbytes = t.nbytes
            for d in range(nd):
                f.dims[d] = shape[d]
        f.conj = 1 if IS_COMPLEX[f.code] and t.is_conj() else 0
    except Exception:
        return -1
    return 0


cdef inline uint64_t mix(uint64_t h, uint64_t v) noexcept nogil:
    h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2)
    return h


# =================================================================== worker
cdef enum CallState:
    C_IDLE = 0
    C_DEFERRED = 1  # sends held back until the caller's stream reaches the event
    C_POSTED = 2
    C_REFUSED = 3  # a server refused: its reason is on its way
    C_LATE = 4  # the responses are in; written answers a server sent as messages instead are being received


cdef struct Push:
    int index  # inline pushes only
    int device  # 1: device memory (inline pushes: staged through pinned memory; separate: the memory type told to UCX)
    int lane  # separate pushes only: sent on the lane
    uint64_t ptr, nbytes, offset, slot
    const void *param  # separate device pushes: a MemMap's param (STEPMESH_MEMORY_HINTS=all), or NULL


cdef struct Answer:
    int device  # 1: the pull tensor is device memory
    int how  # wire.AnswerWay: ANSWER_COPY, ANSWER_SCATTER, ANSWER_SEPARATE, ANSWER_PACKED, ANSWER_LANE, ANSWER_WRITTEN
    uint64_t ptr, cap, offset
    const void *param  # answers received into device pull tensors: a MemMap's param (all), or NULL


cdef class Plan:
    """Everything a push_pull signature needs, built once (``Worker.add_plan``)."""

    cdef Fact *facts
    cdef int64_t *keys
    cdef int n_push, n_pull, need_event, device, pinned, evicted
    cdef uint64_t hash
    cdef object endpoints  # keeps the ucxx endpoints (and so their handles) alive
    cdef uint64_t *eps
    cdef uint64_t *lane_eps  # per server: the endpoint to its lane (0: none)
    cdef int n_servers, per, n_handles
    cdef bytes template
    cdef size_t hlen
    cdef uint64_t req_tag, push_tag
    cdef Push *inline_push
    cdef int n_inline, n_inline_device
    cdef Push *sep_push
    cdef int n_sep
    cdef uint64_t *ans_pack_size  # per server: bytes of its packed answers' buffer, 0: none
    cdef size_t resp_size, resp_pos
    cdef uint64_t *resp_tag  # per server: RESPONSE | its node id
    cdef uint64_t *pull_tag  # per server: PULL | its node id
    cdef Answer *answers  # per server, per answer
    cdef int *n_sep_answers  # per server
    cdef int *scatter  # per server: the scattered answer's index or -1
    cdef list free_calls  # idle Calls of this plan (cleared when the plan is dropped: no cycle outlives it)
    cdef list maps  # the MemMaps its device pushes and answers pass (alive as long as the plan)
    cdef int n_mapped, n_written
    cdef uint64_t *mapped_at  # per mapped buffer: its address, then the id of the allocation it was mapped in

    def __dealloc__(self):
        free(self.mapped_at)
        free(self.facts)
        free(self.keys)
        free(self.eps)
        free(self.lane_eps)
        free(self.inline_push)
        free(self.sep_push)
        free(self.ans_pack_size)
        free(self.resp_tag)
        free(self.pull_tag)
        free(self.answers)
        free(self.n_sep_answers)
        free(self.scatter)


@cython.no_gc_clear
cdef class Call:
    """One push_pull in flight, recycled through its plan (its buffers stay with it)."""

    cdef Plan plan
    cdef int state, n_servers, mem_kind, device
    cdef uint32_t seq
    cdef int64_t handle
    cdef uint8_t *header
    cdef uint8_t **resp
    cdef uint64_t *iov  # per server: [response, header bytes, pull tensor, capacity] when one answer is scattered
    cdef Ops recvs, sends
    cdef int *recv_lo  # per server: its receives are recv_lo[s]..recv_lo[s + 1]-1
    cdef object push, pull  # the caller's tensors, alive until complete
    cdef void *event
    cdef uint64_t t_start, t_sent
    cdef uint8_t *refusal
    cdef int refused_server
    cdef Ops refusal_ops
    cdef Ops late  # the receives of written answers a server sent as messages instead (plans with written answers)
    cdef void **pack_in  # per server, device: its packed answers (or NULL)

    def __dealloc__(self):
        cdef int s
        if self.state != C_IDLE:
            return  # in flight when its core went: UCX may still use the memory, leave it
        mem_put(self.mem_kind, self.header, self.device)
        if self.resp != NULL:
            for s in range(self.n_servers):
                mem_put(self.mem_kind, self.resp[s], self.device)
        if self.pack_in != NULL:
            for s in range(self.n_servers):
                mem_put(MEM_DEVICE, self.pack_in[s], self.device)
        free(self.pack_in)
        free(self.resp)
        free(self.iov)
        free(self.recv_lo)
        free(self.refusal)


cdef Call new_call(Plan p):
    cdef Call c = Call.__new__(Call)
    cdef int s, j, n_recv = 0
    c.plan = p
    c.n_servers = p.n_servers
    c.mem_kind = MEM_PINNED if p.pinned else MEM_HOST
    c.device = p.device
    c.state = C_IDLE
    c.resp = <uint8_t **>calloc(p.n_servers, sizeof(uint8_t *))
    c.iov = <uint64_t *>calloc(p.n_servers * 4, sizeof(uint64_t))
    c.recv_lo = <int *>calloc(p.n_servers + 1, sizeof(int))
    c.pack_in = <void **>calloc(p.n_servers, sizeof(void *))
    if c.resp == NULL or c.iov == NULL or c.recv_lo == NULL or c.pack_in == NULL:
        raise MemoryError()
    c.header = <uint8_t *>mem_get(c.mem_kind, p.hlen, p.device)
    memcpy(c.header, <const char *>p.template, len(p.template))
    for s in range(p.n_servers):
        c.resp[s] = <uint8_t *>mem_get(c.mem_kind, p.resp_size, p.device)
        if p.ans_pack_size[s]:
            c.pack_in[s] = mem_get(MEM_DEVICE, p.ans_pack_size[s], p.device)
        c.recv_lo[s] = n_recv
        n_recv += 1 + p.n_sep_answers[s] + (1 if p.ans_pack_size[s] else 0)
        if p.scatter[s] >= 0:
            j = p.scatter[s]
            c.iov[4 * s] = <uintptr_t>c.resp[s]
            c.iov[4 * s + 1] = p.resp_pos
            c.iov[4 * s + 2] = p.answers[s * p.per + j].ptr
            c.iov[4 * s + 3] = p.answers[s * p.per + j].cap
    c.recv_lo[p.n_servers] = n_recv
    c.recvs = Ops(n_recv)
    c.sends = Ops(p.n_servers * (1 + p.n_sep))
    c.refusal_ops = Ops(1)
    c.late = Ops(p.n_written)
    return c


cdef inline bint moved_answer(Call c, int s, int j) noexcept:
    """Whether server ``s`` sent written answer ``j`` of call ``c`` as a message after all (its response says
    so: MOVED in the answer's size)."""
    cdef uint64_t size
    if c.plan.answers[s * c.plan.per + j].how != ANSWER_WRITTEN:
        return False
    memcpy(&size, c.resp[s] + RESP_FIXED_SIZE + RESP_SIZE_SIZE * j, 8)
    return (size & MOVED) != 0


cdef class Worker:
    """The worker side's steady state: ``Worker(ucp, n_servers)``; plans come from Python (``add_plan``)."""

    cdef Ucp ucp
    cdef int n_servers
    cdef list table  # TABLE plans, direct-mapped by signature hash
    cdef dict calls  # handle -> Call in flight
    cdef dict failures  # handle -> the failure tuple of a call that failed
    cdef list deferred  # Calls whose sends wait for their event, in issue order
    cdef uint32_t seq
    cdef int64_t next_handle_
    cdef Fact *scratch
    cdef int64_t *scratch_keys
    # traces: a ring of TRACE_KEEP calls, n_servers rows of 8 stamps each
    cdef uint64_t *traces
    cdef int64_t *trace_handle
    cdef int *trace_count
    cdef int trace_next
    cdef dict trace_at  # every handle of a kept call -> its ring slot
    cdef bint closed
    cdef int n_mapped  # device buffers mapped for the plans made so far (STEPMESH_MEMORY_HINTS=all)
    cdef int n_remade  # calls refused as NO_PLAN because a mapped address is in another allocation now

    def __cinit__(self, Ucp ucp, int n_servers):
        self.ucp = ucp
        self.n_servers = n_servers
        self.table = [None] * TABLE
        self.calls = {}
        self.failures = {}
        self.deferred = []
        self.seq = 0
        self.next_handle_ = 1
        self.scratch = <Fact *>calloc(MAX_TENSORS + MAX_PULLS, sizeof(Fact))
        self.scratch_keys = <int64_t *>calloc(MAX_TENSORS + MAX_PULLS, sizeof(int64_t))
        self.traces = <uint64_t *>calloc(TRACE_KEEP * max(n_servers, 1) * 8, sizeof(uint64_t))
        self.trace_handle = <int64_t *>calloc(TRACE_KEEP, sizeof(int64_t))
        self.trace_count = <int *>calloc(TRACE_KEEP, sizeof(int))
        if not (self.scratch and self.scratch_keys and self.traces and self.trace_handle and self.trace_count):
            raise MemoryError()
        self.trace_at = {}

    def __dealloc__(self):
        free(self.scratch)
        free(self.scratch_keys)
        free(self.traces)
        free(self.trace_handle)
        free(self.trace_count)

    # ------------------------------------------------------------ planning
    def add_plan(self, dict spec):
        """Remember the plan Python made for one signature (see ``stepmesh.data.worker``)."""
        cdef Plan p = Plan.__new__(Plan)
        cdef list push = spec["push"], pull = spec["pull"], push_keys = spec["push_keys"], pull_keys = spec["pull_keys"]
        cdef int i, s, j, k
        p.n_push = len(push)
        p.n_pull = len(pull)
        p.facts = <Fact *>calloc(max(p.n_push + p.n_pull, 1), sizeof(Fact))
        p.keys = <int64_t *>calloc(max(p.n_push + p.n_pull, 1), sizeof(int64_t))
        if p.facts == NULL or p.keys == NULL:
            raise MemoryError()
        for i in range(p.n_push):
            if read_fact(push[i], &p.facts[i]) < 0:
                raise TypeError(f"push_tensors[{i}] is not a usable tensor")
            p.keys[i] = push_keys[i]
        for i in range(p.n_pull):
            if read_fact(pull[i], &p.facts[p.n_push + i]) < 0:
                raise TypeError(f"pull_tensors[{i}] is not a usable tensor")
            p.keys[p.n_push + i] = pull_keys[i]
        p.need_event = 1 if spec["need_event"] else 0
        p.hash = self._hash(p.facts, p.keys, p.n_push, p.n_pull, p.need_event)
        p.device = spec["device"]
        p.pinned = 1 if spec["pinned"] else 0
        p.endpoints = spec["endpoints"]
        eps = spec["eps"]
        p.n_servers = len(eps)
        if p.n_servers != self.n_servers:
            raise ValueError("a plan for another number of servers")
        p.eps = <uint64_t *>calloc(max(p.n_servers, 1), sizeof(uint64_t))
        p.lane_eps = <uint64_t *>calloc(max(p.n_servers, 1), sizeof(uint64_t))
        if p.eps == NULL or p.lane_eps == NULL:
            raise MemoryError()
        lane_eps = spec["lane_eps"]
        cdef bint every_lane = True
        for s in range(p.n_servers):
            p.eps[s] = eps[s]
            p.lane_eps[s] = lane_eps[s]
            every_lane = every_lane and p.lane_eps[s] != 0
        p.per = spec["per"]
        p.n_handles = spec["n_handles"]
        p.template = spec["template"]
        p.hlen = spec["hlen"]
        p.req_tag = spec["req_tag"]
        p.push_tag = spec["push_tag"]
        inline = spec["inline_push"]  # (index, device, ptr, nbytes, offset)
        p.n_inline = len(inline)
        p.inline_push = <Push *>calloc(max(p.n_inline, 1), sizeof(Push))
        p.n_inline_device = 0
        for k in range(p.n_inline):
            item = inline[k]
            p.inline_push[k].index = item[0]
            p.inline_push[k].device = item[1]
            p.inline_push[k].ptr = item[2]
            p.inline_push[k].nbytes = item[3]
            p.inline_push[k].offset = item[4]
            p.n_inline_device += p.inline_push[k].device
        sep = spec["sep_push"]  # (ptr, nbytes, slot, on the lane, device memory)
        p.n_sep = len(sep)
        p.sep_push = <Push *>calloc(max(p.n_sep, 1), sizeof(Push))
        for k in range(p.n_sep):
            item = sep[k]
            p.sep_push[k].ptr = item[0]
            p.sep_push[k].nbytes = item[1]
            p.sep_push[k].slot = item[2]
            p.sep_push[k].lane = 1 if item[3] else 0
            p.sep_push[k].device = 1 if item[4] else 0
            if p.sep_push[k].lane and not every_lane:
                raise ValueError("a push on the lane of a server without one")
        p.resp_size = spec["resp_size"]
        p.resp_pos = spec["resp_pos"]
        p.resp_tag = <uint64_t *>calloc(p.n_servers, sizeof(uint64_t))
        p.pull_tag = <uint64_t *>calloc(p.n_servers, sizeof(uint64_t))
        p.answers = <Answer *>calloc(max(p.n_servers * p.per, 1), sizeof(Answer))
        p.n_sep_answers = <int *>calloc(p.n_servers, sizeof(int))
        p.scatter = <int *>calloc(p.n_servers, sizeof(int))
        p.ans_pack_size = <uint64_t *>calloc(p.n_servers, sizeof(uint64_t))
        # per server: (resp tag, pull tag, scatter index or -1, [(device, ptr, cap, how, pack offset)], pack size)
        servers = spec["servers"]
        for s in range(p.n_servers):
            item = servers[s]
            p.resp_tag[s] = item[0]
            p.pull_tag[s] = item[1]
            p.scatter[s] = item[2]
            p.ans_pack_size[s] = item[4]
            answers = item[3]
            if len(answers) != p.per:
                raise ValueError("a server's share of answers has the wrong length")
            for j in range(p.per):
                a = answers[j]
                p.answers[s * p.per + j].device = a[0]
                p.answers[s * p.per + j].ptr = a[1]
                p.answers[s * p.per + j].cap = a[2]
                p.answers[s * p.per + j].how = a[3]
                p.answers[s * p.per + j].offset = a[4]
                if a[3] == ANSWER_LANE and not every_lane:
                    raise ValueError("an answer on the lane of a server without one")
                if a[3] == ANSWER_SCATTER and a[0]:
                    raise ValueError("a device answer scattered behind the response header (one iov takes one memory type)")
                if a[3] == ANSWER_SEPARATE or a[3] == ANSWER_LANE:
                    p.n_sep_answers[s] += 1
                if a[3] == ANSWER_WRITTEN:
                    if s * p.per + j not in spec["written"]:
                        raise ValueError("a written answer without its mapping")
                    p.n_written += 1
        p.free_calls = []
        self._map_plan(p, spec["written"])
        old = self.table[p.hash % TABLE]
        if old is not None:
            (<Plan>old).evicted = 1
            (<Plan>old).free_calls = []
        self.table[p.hash % TABLE] = p

    cdef int _map_plan(self, Plan p, dict written) except -1:
        """Map the plan's separately sent device pushes and separately received device answers with
        ``ucp_mem_map`` (``Ucp.map``: at STEPMESH_MEMORY_HINTS=all, not in thread mode), so that UCX takes their
        memory type from the handle instead of looking each address up. The plan does not hold the tensors: each
        call checks that the allocations are the ones mapped (``buffer_id``), and a changed one is a new plan;
        after REMAKE_LIMIT such plans the worker maps no more (allocations that churn would cost a mapping a call).
        Written answers come mapped (``written``: answer index -> (MemMap, allocation id), from ``pack_rkey``):
        their keys are in the plan's header, so their allocations are checked alike."""
        cdef int k, j
        cdef Answer *a
        p.maps = []
        p.mapped_at = <uint64_t *>calloc(2 * (p.n_sep + p.n_servers * p.per) + 2, sizeof(uint64_t))
        if p.mapped_at == NULL:
            raise MemoryError()
        for j, (m, bid) in written.items():
            p.answers[j].param = self._adopt(p, m, p.answers[j].ptr, bid)
        if p.device < 0 or drv.kind != 1 or not self.ucp.maps() or self.n_remade >= REMAKE_LIMIT:
            return 0  # past REMAKE_LIMIT the caller's allocations change too often for mappings to pay
        dev_enter(p.device)
        for k in range(p.n_sep):
            if p.sep_push[k].device:
                p.sep_push[k].param = self._map_one(p, p.sep_push[k].ptr, p.sep_push[k].nbytes, p.sep_push[k].lane)
        for j in range(p.n_servers * p.per):
            a = &p.answers[j]
            if a.device and (a.how == ANSWER_SEPARATE or a.how == ANSWER_LANE):
                a.param = self._map_one(p, a.ptr, a.cap, a.how == ANSWER_LANE)
        return 0

    cdef const void *_map_one(self, Plan p, uint64_t ptr, uint64_t nbytes, bint lane) except? NULL:
        cdef uint64_t bid = buffer_id(ptr)
        if bid == 0:
            return NULL
        cdef object m = self.ucp.map(ptr, nbytes, lane, None)
        if m is None:
            return NULL
        return self._adopt(p, m, ptr, bid)

    cdef const void *_adopt(self, Plan p, MemMap m, uint64_t ptr, uint64_t bid) except? NULL:
        """Keep ``m`` with the plan, checked at every call while ``bid`` (an allocation's id; 0: host memory,
        which is not checked); its param."""
        p.maps.append(m)
        if bid != 0:
            p.mapped_at[2 * p.n_mapped] = ptr
            p.mapped_at[2 * p.n_mapped + 1] = bid
            p.n_mapped += 1
        self.n_mapped += 1
        return <const void *>&m.param[0]

    @property
    def writes(self):
        """Whether plans may have written answers now (``Ucp.writes``, and fewer than REMAKE_LIMIT plans remade)."""
        return self.ucp.writes() and self.n_remade < REMAKE_LIMIT

    cdef int _maps_hold(self, Plan p) except -1:
        """Whether every buffer the plan mapped is still in the allocation it was mapped in."""
        cdef int i
        dev_enter(p.device)
        for i in range(p.n_mapped):
            if buffer_id(p.mapped_at[2 * i]) != p.mapped_at[2 * i + 1]:
                return False
        return True

    cdef uint64_t _hash(self, Fact *facts, int64_t *keys, int n_push, int n_pull, int need_event) noexcept:
        cdef uint64_t h = mix(<uint64_t>n_push, <uint64_t>n_pull * 131 + <uint64_t>need_event)
        cdef int i, d
        for i in range(n_push + n_pull):
            h = mix(h, facts[i].ptr)
            h = mix(h, <uint64_t>facts[i].code * 2 + <uint64_t>facts[i].conj)
            h = mix(h, <uint64_t>(facts[i].device + 2) * 4 + <uint64_t>facts[i].contig * 2)
            for d in range(facts[i].ndim):
                h = mix(h, <uint64_t>facts[i].dims[d])
            h = mix(h, <uint64_t>keys[i])
        return h

    def forget_plans(self):
        """Drop every plan (a server rejoined at a new endpoint: plans hold the old ones)."""
        for p in self.table:
            if p is not None:
                (<Plan>p).evicted = 1
                (<Plan>p).free_calls = []
        self.table = [None] * TABLE

    # ------------------------------------------------------------ push_pull
    def push_pull(self, object push, object push_keys, object pull, object pull_keys, object need_event):
        """Match the signature and post the call: its handle (> 0), or ``-Result`` (NO_PLAN, LIMIT, CLOSED)."""
        if self.closed:
            return -R_CLOSED
        if type(push) is not list or type(pull) is not list or type(push_keys) is not list \
                or type(pull_keys) is not list:
            return -R_NO_PLAN
        cdef list lpush = <list>push, lpull = <list>pull, lpk = <list>push_keys, lqk = <list>pull_keys
        cdef Py_ssize_t n_push = len(lpush), n_pull = len(lpull), i
        if n_push > MAX_TENSORS or n_pull > MAX_PULLS or len(lpk) != n_push or len(lqk) != n_pull:
            return -R_NO_PLAN
        cdef int ev
        if need_event is True:
            ev = 1
        elif need_event is False:
            ev = 0
        else:
            return -R_NO_PLAN
        cdef Fact *f = self.scratch
        cdef int64_t *keys = self.scratch_keys
        memset(f, 0, (n_push + n_pull) * sizeof(Fact))
        try:
            for i in range(n_push):
                if read_fact(lpush[i], &f[i]) < 0:
                    return -R_NO_PLAN
                k = lpk[i]
                if type(k) is not int:
                    return -R_NO_PLAN
                keys[i] = k
            for i in range(n_pull):
                if read_fact(lpull[i], &f[n_push + i]) < 0:
                    return -R_NO_PLAN
                k = lqk[i]
                if type(k) is not int:
                    return -R_NO_PLAN
                keys[n_push + i] = k
        except OverflowError:
            return -R_NO_PLAN
        cdef uint64_t h = self._hash(f, keys, <int>n_push, <int>n_pull, ev)
        cdef object found = self.table[h % TABLE]
        if found is None:
            return -R_NO_PLAN
        cdef Plan p = <Plan>found
        if p.hash != h or p.n_push != n_push or p.n_pull != n_pull or p.need_event != ev \
                or memcmp(p.facts, f, (n_push + n_pull) * sizeof(Fact)) != 0 \
                or memcmp(p.keys, keys, (n_push + n_pull) * sizeof(int64_t)) != 0:
            return -R_NO_PLAN
        if p.n_mapped and not self._maps_hold(p):  # memory freed and allocated again at a mapped address
            self.n_remade += 1
            return -R_NO_PLAN
        if len(self.calls) >= MAX_IN_FLIGHT:
            return -R_LIMIT
        return self._post(p, lpush, lpull)

    cdef int64_t _post(self, Plan p, list push, list pull) except -1:
        cdef Call c = p.free_calls.pop() if p.free_calls else new_call(p)
        cdef int s, j, k
        cdef void *stream = NULL
        cdef bint copies = False
        cdef Answer *a
        cdef Ucp ucp = self.ucp
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        c.seq = self.seq
        c.handle = self.next_handle_
        self.next_handle_ += p.n_handles
        c.t_start = now_ns()
        c.t_sent = 0
        c.push = push
        c.pull = pull
        c.event = NULL
        c.refused_server = -1
        memcpy(c.header + SEQ_OFFSET, &c.seq, 4)
        # small pushes behind the header: host ones copied now, device ones staged on a stream
        for k in range(p.n_inline):
            if not p.inline_push[k].device:
                memcpy(c.header + p.inline_push[k].offset, <void *><uintptr_t>p.inline_push[k].ptr,
                       p.inline_push[k].nbytes)
        if p.device >= 0 and (p.need_event or p.n_inline_device):
            dev_enter(p.device)
            stream = current_stream(p.device) if p.need_event else core_stream(p.device)
            for k in range(p.n_inline):
                if p.inline_push[k].device:
                    _drv_check(drv.d2h(c.header + p.inline_push[k].offset, p.inline_push[k].ptr,
                                       p.inline_push[k].nbytes, stream), "staging a push")
                    copies = True
            if p.need_event:
                if copies or drv.stream_query(stream) != DRV_SUCCESS:
                    c.event = event_take(p.device)
                    _drv_check(drv.event_record(c.event, stream), "recording an event")
            elif copies:
                sync_core_stream(p.device)
        self.calls[c.handle] = c
        if c.event != NULL or self.deferred:  # later calls never overtake a held-back one
            c.state = C_DEFERRED
            self.deferred.append(c)
            self._kick()
        else:
            self._send(c)
        # The request leaves first; the receives for the answers follow while it travels (they land straight
        # in the pull tensors; an answer cannot come before its request, and one that did would wait in UCX).
        c.recvs.clear()
        c.late.clear()
        cdef uint64_t bits = <uint64_t>c.seq << SEQ_SHIFT
        for s in range(p.n_servers):
            if p.scatter[s] >= 0:
                c.recvs.add(ucp.recv_raw(&c.iov[4 * s], 2, p.resp_tag[s] | bits, FULL_MASK, True, HINT_HOST))
            else:
                c.recvs.add(ucp.recv_raw(c.resp[s], p.resp_size, p.resp_tag[s] | bits, FULL_MASK, False, HINT_HOST))
            for j in range(p.per):
                a = &p.answers[s * p.per + j]
                if a.how == ANSWER_SEPARATE or a.how == ANSWER_LANE:
                    c.recvs.recv(ucp, <void *><uintptr_t>a.ptr, a.cap, p.pull_tag[s] | bits | <uint64_t>j,
                                 ucp.mapped_or(a.param, a.device), a.how == ANSWER_LANE)
            if p.ans_pack_size[s]:
                c.recvs.add(ucp.recv_raw(c.pack_in[s], p.ans_pack_size[s], p.pull_tag[s] | bits | PACK_SLOT,
                                         FULL_MASK, False, HINT_CUDA))
        return c.handle

    cdef void _send(self, Call c) noexcept:
        cdef Plan p = c.plan
        cdef int s, k
        cdef Push *q
        cdef Ucp ucp = self.ucp
        cdef uint64_t bits = <uint64_t>c.seq << SEQ_SHIFT
        c.sends.clear()
        for s in range(p.n_servers):
            c.sends.add(ucp.send_raw(p.eps[s], c.header, p.hlen, p.req_tag | bits, False, HINT_HOST))
            for k in range(p.n_sep):
                q = &p.sep_push[k]
                c.sends.add(ucp.send_param(p.lane_eps[s] if q.lane else p.eps[s], <void *><uintptr_t>q.ptr, q.nbytes,
                                           p.push_tag | bits | q.slot, ucp.mapped_or(q.param, q.device)))
        c.t_sent = now_ns()
        c.state = C_POSTED

    cdef int _kick(self) except -1:
        """Send held-back calls, in order, whose event has completed."""
        cdef Call c
        cdef int rc
        while self.deferred:
            c = <Call>self.deferred[0]
            if c.event != NULL:
                rc = drv.event_query(c.event)
                if rc == DRV_NOT_READY:
                    return 0
                event_give(c.plan.device, c.event)
                c.event = NULL
                _drv_check(rc, "waiting for the caller's stream")
            self.deferred.pop(0)
            self._send(c)
        return 0

    def kick(self):
        """Send the held-back calls whose stream work has completed; how many still wait."""
        if self.deferred:
            self._kick()
        return len(self.deferred)

    # ----------------------------------------------------------------- wait
    cdef bint _settled(self, Call c) except -1:
        if self.deferred:
            self._kick()
        if c.state == C_DEFERRED:
            return False
        cdef bint done = c.recvs.settled(self.ucp, 0, c.recvs.n)
        done = c.sends.settled(self.ucp, 0, c.sends.n) and done
        if c.state == C_REFUSED:
            done = c.refusal_ops.settled(self.ucp, 0, 1) and done
        if c.state == C_REFUSED or c.state == C_LATE:
            done = c.late.settled(self.ucp, 0, c.late.n) and done
        return done

    def wait(self, int64_t handle, uint64_t spins):
        """Busy-poll at most ``spins`` steps for call ``handle``, then finish it: a Result code.

        DONE: complete and checked. PENDING: not yet. FAILED: ``failure(handle)``
        says why. UNKNOWN: never issued, or already waited for.
        """
        cdef object found = self.calls.get(handle)
        if found is None:
            return R_FAILED if handle in self.failures else R_UNKNOWN
        cdef Call c = <Call>found
        cdef uint64_t i = 0
        cdef unsigned moved
        cdef bint done = self._settled(c)
        while not done and i < spins:
            moved = self.ucp.progress_raw()
            if moved:
                self.ucp.drain()
            if moved or (i & 3) == 0 or self.deferred:  # a held-back send goes the moment its event completes
                done = self._settled(c)
            i += 1
        if not done:
            return R_PENDING
        return self._finish(c)

    cdef int _finish(self, Call c) except -1:
        cdef Plan p = c.plan
        cdef int s, j, rc, err
        cdef uint8_t *r
        cdef uint16_t status, n
        cdef uint32_t seq
        cdef uint64_t size, pos
        cdef Answer *a
        cdef bint staged = False
        if c.state == C_REFUSED:
            return self._fail(c, (F_REFUSED, c.refused_server, self._refusal_text(c)))
        err = c.recvs.first_error(0, c.recvs.n) or c.sends.first_error(0, c.sends.n) or c.late.first_error(0, c.late.n)
        if err:
            for s in range(p.n_servers):
                if c.recvs.first_error(c.recv_lo[s], c.recv_lo[s + 1]):
                    return self._fail(c, (F_UCX, s, err))
            return self._fail(c, (F_UCX, -1, err))
        cdef int refused = -1
        for s in range(p.n_servers):
            r = c.resp[s]
            memcpy(&status, r + RESP_STATUS_AT, 2)
            memcpy(&n, r + RESP_N_AT, 2)
            memcpy(&seq, r + RESP_SEQ_AT, 4)
            if r[0] != DATA_VERSION or seq != c.seq or n != p.per:
                return self._fail(c, (F_BAD_RESPONSE, s, r[0], seq, n))
            if status != STATUS_OK and refused < 0:
                refused = s
        # Written answers the servers sent as messages after all are received even when another server refused:
        # a server's send of one waits for the worker to take it.
        if p.n_written and c.state != C_LATE:
            self._receive_moved(c)
        if refused >= 0:  # its reason follows in a message of its own
            s = refused
            c.refused_server = s
            c.state = C_REFUSED
            if c.refusal == NULL:
                c.refusal = <uint8_t *>calloc(REFUSAL_MAX + 1, 1)
                if c.refusal == NULL:
                    raise MemoryError()
            memset(c.refusal, 0, REFUSAL_MAX + 1)
            c.refusal_ops.clear()
            c.refusal_ops.add(self.ucp.recv_raw(c.refusal, REFUSAL_MAX, p.resp_tag[s] | (<uint64_t>c.seq << SEQ_SHIFT)
                                                | REFUSAL_SLOT, FULL_MASK, False, HINT_HOST))
            return R_PENDING
        if c.state == C_LATE and not c.late.settled(self.ucp, 0, c.late.n):
            return R_PENDING
        for s in range(p.n_servers):
            r = c.resp[s]
            pos = p.resp_pos
            for j in range(p.per):
                memcpy(&size, r + RESP_FIXED_SIZE + RESP_SIZE_SIZE * j, 8)
                a = &p.answers[s * p.per + j]
                if a.how == ANSWER_WRITTEN:
                    size &= ~MOVED
                if size > a.cap:
                    return self._fail_copying(c, staged, (F_TOO_LONG, s, j, size, a.cap))
                if a.how == ANSWER_PACKED and size:
                    if not staged:
                        dev_enter(p.device)
                        staged = True
                    rc = drv.d2d(a.ptr, <uint64_t><uintptr_t>c.pack_in[s] + a.offset, size, core_stream(p.device))
                    if rc != DRV_SUCCESS:
                        return self._fail_copying(c, staged, (F_DEVICE, s, rc))
                if a.how != ANSWER_COPY or not size:
                    continue
                if pos + size > p.resp_size:
                    return self._fail_copying(c, staged, (F_BAD_RESPONSE, s, r[0], c.seq, n))
                if a.device:
                    if not staged:
                        dev_enter(p.device)
                        staged = True
                    rc = drv.h2d(a.ptr, r + pos, size, core_stream(p.device))
                    if rc != DRV_SUCCESS:
                        return self._fail_copying(c, staged, (F_DEVICE, s, rc))
                else:
                    memcpy(<void *><uintptr_t>a.ptr, r + pos, size)
                pos += size
        if staged:
            rc = drv.stream_sync(core_stream(p.device))
            if rc != DRV_SUCCESS:
                return self._fail(c, (F_DEVICE, -1, rc))
        self._trace(c)
        self._release(c)
        return R_DONE

    cdef bint _receive_moved(self, Call c) except -1:
        """Post the receives of the written answers the servers sent as messages instead (their sizes carry
        MOVED); whether there are any (the call then waits for them: ``C_LATE``)."""
        cdef Plan p = c.plan
        cdef int s, j
        cdef Answer *a
        cdef uint64_t bits = <uint64_t>c.seq << SEQ_SHIFT
        for s in range(p.n_servers):
            for j in range(p.per):
                if moved_answer(c, s, j):
                    a = &p.answers[s * p.per + j]
                    c.late.recv(self.ucp, <void *><uintptr_t>a.ptr, a.cap, p.pull_tag[s] | bits | <uint64_t>j,
                                self.ucp.mapped_or(a.param, a.device), False)
        if not c.late.n:
            return False
        c.state = C_LATE
        return True

    cdef int _fail_copying(self, Call c, bint staged, tuple why) except -1:
        """Fail a call whose answers were being copied out: the copies end first (the call's buffers are reused)."""
        if staged:
            drv.stream_sync(core_stream(c.plan.device))
        return self._fail(c, why)

    cdef str _refusal_text(self, Call c):
        cdef bytes raw = (<char *>c.refusal)[:REFUSAL_MAX]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or "(its reason did not arrive)"

    cdef int _fail(self, Call c, tuple why) except -1:
        self.failures[c.handle] = why
        if len(self.failures) > 64:
            del self.failures[next(iter(self.failures))]
        self._release(c)
        return R_FAILED

    cdef void _release(self, Call c) noexcept:
        del self.calls[c.handle]
        c.state = C_IDLE
        c.push = None
        c.pull = None
        if not c.plan.evicted:
            c.plan.free_calls.append(c)

    def failure(self, int64_t handle):
        """Why call ``handle`` failed (a tuple led by a :class:`~stepmesh.data.wire.Failure`), once; or None."""
        return self.failures.pop(handle, None)

    def waiting(self, int64_t handle):
        """The servers (indexes) whose answers to ``handle`` have not all arrived; None for an unknown handle."""
        cdef object found = self.calls.get(handle)
        if found is None:
            return None
        cdef Call c = <Call>found
        cdef int s, j
        if c.state == C_DEFERRED:
            return list(range(c.plan.n_servers))
        if c.state == C_LATE:  # the servers whose answers sent as messages after all are not all in
            if c.late.settled(self.ucp, 0, c.late.n):
                return []
            return [s for s in range(c.plan.n_servers) if any([moved_answer(c, s, j) for j in range(c.plan.per)])]
        return [s for s in range(c.plan.n_servers) if not c.recvs.settled(self.ucp, c.recv_lo[s], c.recv_lo[s + 1])]

    # --------------------------------------------------------------- traces
    cdef void _trace(self, Call c) noexcept:
        cdef Plan p = c.plan
        cdef int slot = self.trace_next
        cdef int s, i
        cdef uint64_t *row
        cdef uint64_t arrived, t_end = now_ns()
        cdef int64_t old = self.trace_handle[slot]
        if old:
            for i in range(self.trace_count[slot]):
                self.trace_at.pop(old + i, None)
        self.trace_handle[slot] = c.handle
        self.trace_count[slot] = p.n_handles
        for i in range(p.n_handles):
            self.trace_at[c.handle + i] = slot
        for s in range(p.n_servers):
            row = &self.traces[(slot * self.n_servers + s) * 8]
            row[0] = c.t_start
            row[1] = c.t_sent
            memcpy(&row[2], c.resp[s] + RESP_STAMPS_AT, 32)
            arrived = c.t_sent
            for i in range(c.recv_lo[s], c.recv_lo[s + 1]):
                if c.recvs.t_done[i] > arrived:
                    arrived = c.recvs.t_done[i]
            row[6] = arrived
            row[7] = t_end
        self.trace_next = (slot + 1) % TRACE_KEEP

    def trace(self, int64_t handle):
        """Per server, the 8 stamps of the kept call that ``handle`` (or a sub-handle) belongs to; None if none."""
        cdef object slot = self.trace_at.get(handle)
        if slot is None:
            return None
        cdef int k = slot, s, i
        return [[self.traces[(k * self.n_servers + s) * 8 + i] for i in range(8)] for s in range(self.n_servers)]

    def handles_of(self, int64_t handle):
        """(first handle, how many) of the call ``handle`` belongs to, in flight or kept; None if neither."""
        cdef object found = self.calls.get(handle)
        if found is not None:
            return handle, (<Call>found).plan.n_handles
        cdef object slot = self.trace_at.get(handle)
        if slot is not None:
            return self.trace_handle[<int>slot], self.trace_count[<int>slot]
        return None

    @property
    def next_handle(self):
        return self.next_handle_

    @property
    def mapped(self):
        """Device buffers mapped with ``ucp_mem_map`` for the plans made so far (each plan maps its own)."""
        return self.n_mapped

    @property
    def remade(self):
        """Plans made again because memory was freed and allocated anew at an address a plan had mapped."""
        return self.n_remade

    @property
    def in_flight(self):
        return len(self.calls)

    def close(self):
        """Cancel every call in flight; their memory is left to UCX (never freed under it)."""
        self.closed = True
        cdef bint abandoned
        for c in list(self.calls.values()):
            abandoned = (<Call>c).recvs.abandon(self.ucp)
            abandoned = (<Call>c).sends.abandon(self.ucp) or abandoned
            (<Call>c).refusal_ops.abandon(self.ucp)
            abandoned = (<Call>c).late.abandon(self.ucp) or abandoned
            # a receive UCX matched writes on into the pull tensors, as a server may still put written answers:
            # they stay, as the mappings do
            if abandoned or (<Call>c).plan.n_written:
                _LEFT_TO_UCX.append(((<Call>c).push, (<Call>c).pull))
                for m in (<Call>c).plan.maps:
                    (<MemMap>m).leave_to_ucx()
        self.calls.clear()
        self.deferred.clear()
        self.forget_plans()


# =================================================================== server
cdef struct PushDest:
    int placement
    int dest_device  # the destination's device index, -1: host
    int fresh  # 1: a new tensor per request
    uint64_t ptr  # a registered chunk's address (fresh: read from the new tensor)
    uint64_t nbytes, offset  # offset: an inline push's place in the slot
    const void *param  # a registered chunk mapped on the context it arrives on (MemMap.param), or NULL


cdef class Layout:
    """A decoded request layout of one worker, matched by its header's bytes (the sequence aside)."""

    cdef bytes head
    cdef uint64_t hash
    cdef int size, n_push, n_pull, n_sep_push, n_sep_pull, evicted
    cdef PushDest *push
    cdef list views  # per push: the registered chunk's view, or None
    cdef list maps  # the MemMaps the pushes' params point into (alive as long as the layout)
    cdef list shapes, dtypes, devices  # per push: what a fresh tensor is made of
    cdef object alloc_ctx  # a torch stream context: fresh device tensors come from a stream of their own
    cdef list keys, pull_keys
    cdef uint64_t *caps
    cdef int *placements
    cdef uint64_t *ans_at  # per answer: its offset in the packed answers' buffer (PACKED)
    cdef uint64_t ans_pack_size  # 0: no packed answers
    cdef size_t resp_pos, resp_size
    cdef Pool resp_pool
    cdef list staging  # per answer: {device index (-1: host): Pool}, made when an answer is first staged
    cdef list free_reqs, free_sendings  # recycled (cleared when the layout is dropped: no cycle outlives it)
    cdef list ans_maps  # per answer: the MemMaps made for the device memory it was lent from (ANSWER_MAPS at most)
    cdef uint64_t *ans_map  # per answer: the newest one's [start, end), its allocation's id, mappings tried
    cdef const void **ans_param  # per answer: the newest one's param, or NULL
    cdef int *pull_dev  # per answer: 1 when the worker's pull tensor is device memory
    cdef void **rkeys  # per answer, WRITTEN: its pull tensor's remote key on the worker's endpoint (NULL: none)
    cdef uint64_t *raddr  # per answer, WRITTEN: its pull tensor's address
    cdef int n_written
    cdef Ucp ucp  # for the keys (destroyed with the layout while the worker lives)

    def __dealloc__(self):
        cdef int j
        if self.rkeys != NULL and self.ucp is not None and not self.ucp.closed:
            for j in range(self.n_pull):
                if self.rkeys[j] != NULL:
                    ucp_rkey_destroy(self.rkeys[j])
        free(self.rkeys)
        free(self.raddr)
        free(self.pull_dev)
        free(self.ans_map)
        free(self.ans_param)
        free(self.push)
        free(self.caps)
        free(self.placements)
        free(self.ans_at)


cdef class Req:
    """A request from one worker, from its header until its answer has left."""

    cdef Layout layout
    cdef int worker
    cdef uint32_t seq
    cdef int64_t handle
    cdef list tensors
    cdef Ops ops  # the receives of its separate pushes
    cdef uint64_t t_recv, t_proc


cdef enum:
    LENT_HOST = -2  # Sending.staged_device: the answer is read from the caller's memory (host)
    LENT_DEVICE = -3  # (device)


@cython.no_gc_clear
cdef class Sending:
    """One response on its way: its sends and the buffers they read; the request it answers stays alive with it."""

    cdef Layout layout
    cdef Req req
    cdef Ops ops
    cdef uint8_t *header
    cdef size_t hlen
    cdef void **staged  # per answer: its staging buffer, the caller's memory (lent), or NULL
    cdef int *staged_device  # per answer: the staging buffer's device, or LENT_HOST / LENT_DEVICE
    cdef void *pack  # the packed answers' buffer (device pack_dev), or NULL
    cdef int pack_dev
    cdef uint64_t pack_len  # bytes sent from it
    cdef bint lends  # some answer is sent from the caller's memory: respond waits until it has left
    cdef uint64_t *sizes
    cdef void *event
    cdef int device
    cdef uint64_t ep
    cdef bytes note  # a refusal's reason
    cdef bint in_flight
    cdef const void **params  # per answer lent from device memory: a MemMap's param (Layout.ans_param), or NULL
    cdef Ops puts  # the written answers' puts, then the endpoint's flush: the header leaves once they are done
    cdef int *put_of  # per put: the answer it writes
    cdef bint header_wait  # the header waits for ``puts``
    cdef Ops moved  # written answers sent as messages after all, from copies: respond does not wait for them
    cdef int *dev_of  # per answer: the caller's tensor's device, -1: host
    cdef uint64_t *ptrs  # per answer: the caller's tensor's address

    def __dealloc__(self):
        if self.in_flight:
            return  # its core went with it in flight: UCX may still read the memory
        free(self.put_of)
        free(self.dev_of)
        free(self.ptrs)
        free(self.params)
        free(self.staged)
        free(self.staged_device)
        free(self.sizes)


cdef inline bint from_device(Sending out, int j) noexcept:
    """Whether answer ``j`` of ``out`` is sent from device memory (a staging buffer on a device, or lent)."""
    return out.staged_device[j] != -1 and out.staged_device[j] != LENT_HOST


cdef inline bint puts_into(Layout lay, int j, bint device) noexcept:
    """Whether the server puts answer ``j`` from memory of that kind: the pull tensor's key unpacked, and UCX puts
    within one kind of memory (host to host, device to device)."""
    return lay.rkeys[j] != NULL and device == lay.pull_dev[j]


cdef Sending new_sending(Layout lay):
    cdef Sending out = Sending.__new__(Sending)
    out.layout = lay
    out.ops = Ops(2 + lay.n_pull)
    out.staged = <void **>calloc(max(lay.n_pull, 1), sizeof(void *))
    out.staged_device = <int *>calloc(max(lay.n_pull, 1), sizeof(int))
    out.sizes = <uint64_t *>calloc(max(lay.n_pull, 1), sizeof(uint64_t))
    out.params = <const void **>calloc(max(lay.n_pull, 1), sizeof(void *))
    out.put_of = <int *>calloc(lay.n_written + 1, sizeof(int))
    out.dev_of = <int *>calloc(max(lay.n_pull, 1), sizeof(int))
    out.ptrs = <uint64_t *>calloc(max(lay.n_pull, 1), sizeof(uint64_t))
    out.puts = Ops(lay.n_written + 1)
    out.moved = Ops(lay.n_written)
    if out.staged == NULL or out.staged_device == NULL or out.sizes == NULL or out.params == NULL \
            or out.put_of == NULL or out.dev_of == NULL or out.ptrs == NULL:
        raise MemoryError()
    return out


cdef class Server:
    """The server side's steady state: receive rings, known layouts, answers staged and sent."""

    cdef Ucp ucp
    cdef int n_workers, pinned, device
    cdef uint64_t *eps
    cdef uint64_t *lane_eps  # per worker: the endpoint to its lane (0: none)
    cdef uint64_t *ring_tag
    cdef uint64_t *push_tag
    cdef uint64_t resp_tag, pull_tag
    cdef uint8_t **slots  # n_workers * RING_DEPTH buffers of SLOT_SIZE
    cdef Ops rings  # their receives, worker-major
    cdef int *head  # per worker: the ring slot that completes next
    cdef list tables  # per worker: LAYOUTS layouts, direct-mapped
    cdef list arriving  # Reqs whose separate pushes are still arriving
    cdef list ready  # per worker: complete Reqs, oldest first
    cdef dict handles  # handle -> Req, between get_batch and respond
    cdef int64_t next_handle
    cdef list sending  # Sendings in flight
    cdef list deferred  # Sendings waiting for their stream event, in order
    cdef dict pools  # (memory kind, device, size class) -> Pool: responses and staging, shared by the layouts
    cdef object alloc_ctx  # a torch stream context: fresh device tensors come from the core's own stream's pool
    cdef int failed_worker, failed_status, new_worker
    cdef bint closed
    cdef object endpoints
    cdef int lent_out  # Sendings in flight that read the caller's memory
    cdef int n_mapped  # registered chunks mapped for the layouts made so far (STEPMESH_MEMORY_HINTS=all)
    cdef int n_lent_mapped  # device memory mapped where answers were lent from (all)
    cdef int n_flushing  # Sendings whose header waits for their written answers' puts
    cdef int n_written_sent, n_moved  # written answers put, and sent as messages instead

    def __cinit__(self, Ucp ucp, list eps, list lane_eps, list endpoints, list ring_tags, list push_tags,
                  uint64_t resp_tag, uint64_t pull_tag, bint pinned, int device):
        cdef int w, k
        self.ucp = ucp
        self.n_workers = len(eps)
        self.pinned = pinned
        self.device = device
        self.endpoints = endpoints
        self.eps = <uint64_t *>calloc(max(self.n_workers, 1), sizeof(uint64_t))
        self.lane_eps = <uint64_t *>calloc(max(self.n_workers, 1), sizeof(uint64_t))
        self.ring_tag = <uint64_t *>calloc(max(self.n_workers, 1), sizeof(uint64_t))
        self.push_tag = <uint64_t *>calloc(max(self.n_workers, 1), sizeof(uint64_t))
        self.head = <int *>calloc(max(self.n_workers, 1), sizeof(int))
        self.slots = <uint8_t **>calloc(max(self.n_workers, 1) * RING_DEPTH, sizeof(uint8_t *))
        if not (self.eps and self.lane_eps and self.ring_tag and self.push_tag and self.head and self.slots):
            raise MemoryError()
        for w in range(self.n_workers):
            self.eps[w] = eps[w]
            self.lane_eps[w] = lane_eps[w]
            self.ring_tag[w] = ring_tags[w]
            self.push_tag[w] = push_tags[w]
        self.resp_tag = resp_tag
        self.pull_tag = pull_tag
        self.tables = [[None] * LAYOUTS for _ in range(self.n_workers)]
        self.arriving = []
        self.ready = [[] for _ in range(self.n_workers)]
        self.handles = {}
        self.next_handle = 1
        self.sending = []
        self.deferred = []
        self.pools = {}
        self.failed_worker = -1
        self.new_worker = -1
        self.rings = Ops(self.n_workers * RING_DEPTH)
        for w in range(self.n_workers):
            for k in range(RING_DEPTH):
                self.slots[w * RING_DEPTH + k] = <uint8_t *>mem_get(MEM_PINNED if pinned else MEM_HOST, SLOT_SIZE,
                                                                    device)
                self.rings.add(NULL)
                self._post(w, k)

    def __dealloc__(self):
        cdef int i
        if self.slots != NULL and not self.closed:
            for i in range(self.n_workers * RING_DEPTH):
                mem_put(MEM_PINNED if self.pinned else MEM_HOST, self.slots[i], self.device)
        free(self.slots)
        free(self.eps)
        free(self.lane_eps)
        free(self.ring_tag)
        free(self.push_tag)
        free(self.head)

    cdef inline void _post(self, int w, int k) noexcept:
        cdef int i = w * RING_DEPTH + k
        cdef void *h = self.ucp.recv_raw(self.slots[i], SLOT_SIZE, self.ring_tag[w], TAG_MASK_KIND_NODE, False,
                                         HINT_HOST)
        self.rings.t_done[i] = 0
        if h == NULL:
            self.rings.h[i] = NULL
            self.rings.status[i] = UCS_OK
        elif <uintptr_t>h >= ERR_MIN:
            self.rings.h[i] = NULL
            self.rings.status[i] = <int><intptr_t>h
        else:
            self.rings.h[i] = h
            self.rings.status[i] = UCS_INPROGRESS

    # ------------------------------------------------------------ layouts
    def add_layout(self, int worker, dict spec):
        """Remember the layout Python decoded from the request waiting in ``worker``'s ring."""
        cdef Layout lay = Layout.__new__(Layout)
        cdef int i, j
        lay.head = spec["head"]
        lay.size = len(lay.head)
        lay.hash = _layout_hash(<const uint8_t *><const char *>lay.head, lay.size)
        pushes = spec["push"]  # (placement, offset, nbytes, view or None, shape, dtype, device index or -1, torch.device)
        lay.n_push = len(pushes)
        lay.push = <PushDest *>calloc(max(lay.n_push, 1), sizeof(PushDest))
        lay.views = []
        lay.maps = []
        lay.shapes = []
        lay.dtypes = []
        lay.devices = []
        lay.alloc_ctx = spec["alloc_ctx"]
        for i in range(lay.n_push):
            placement, offset, nbytes, view, shape, dtype, dev, device = pushes[i]
            lay.push[i].placement = placement
            lay.push[i].offset = offset
            lay.push[i].nbytes = nbytes
            lay.push[i].fresh = view is None
            lay.push[i].ptr = 0 if view is None else view.data_ptr()
            lay.push[i].dest_device = dev
            lay.push[i].param = NULL
            if view is not None and (placement == SEPARATE or placement == LANE):
                m = self.ucp.map(lay.push[i].ptr, view.nbytes, placement == LANE, view)
                if m is not None:
                    lay.maps.append(m)
                    lay.push[i].param = <const void *>&(<MemMap>m).param[0]
            lay.n_sep_push += placement == SEPARATE or placement == LANE
            if placement == LANE and self.ucp.lane == NULL:
                raise ValueError("a push on the lane of a server without one")
            lay.views.append(view)
            lay.shapes.append(shape)
            lay.dtypes.append(dtype)
            lay.devices.append(device)
        lay.keys = spec["keys"]
        lay.pull_keys = spec["pull_keys"]
        # (placement, capacity, offset in the packed answers' buffer, device pull, address and key if WRITTEN)
        pulls = spec["pull"]
        lay.n_pull = len(pulls)
        lay.caps = <uint64_t *>calloc(max(lay.n_pull, 1), sizeof(uint64_t))
        lay.placements = <int *>calloc(max(lay.n_pull, 1), sizeof(int))
        lay.ans_at = <uint64_t *>calloc(max(lay.n_pull, 1), sizeof(uint64_t))
        lay.pull_dev = <int *>calloc(max(lay.n_pull, 1), sizeof(int))
        lay.rkeys = <void **>calloc(max(lay.n_pull, 1), sizeof(void *))
        lay.raddr = <uint64_t *>calloc(max(lay.n_pull, 1), sizeof(uint64_t))
        if not (lay.caps and lay.placements and lay.ans_at and lay.pull_dev and lay.rkeys and lay.raddr):
            raise MemoryError()
        lay.ucp = self.ucp
        lay.ans_pack_size = spec["ans_pack_size"]
        for j in range(lay.n_pull):
            lay.placements[j] = pulls[j][0]
            lay.caps[j] = pulls[j][1]
            lay.ans_at[j] = pulls[j][2]
            lay.pull_dev[j] = 1 if pulls[j][3] else 0
            if lay.placements[j] == WRITTEN:  # a key UCX refuses: the answer goes as a message (MOVED)
                lay.n_written += 1
                lay.raddr[j] = pulls[j][4]
                lay.rkeys[j] = self.ucp.unpack_rkey(self.eps[worker], pulls[j][5])
            lay.n_sep_pull += lay.placements[j] == SEPARATE or lay.placements[j] == LANE
            if lay.placements[j] == LANE and self.lane_eps[worker] == 0:
                raise ValueError("an answer on the lane to a worker without one")
        lay.resp_pos = RESP_FIXED_SIZE + RESP_SIZE_SIZE * lay.n_pull
        lay.resp_size = spec["resp_size"]
        lay.resp_pool = self._pool(MEM_PINNED if self.pinned else MEM_HOST, self.device, lay.resp_size)
        lay.staging = [{} for _ in range(lay.n_pull)]
        lay.ans_maps = [[] for _ in range(lay.n_pull)]
        lay.ans_map = <uint64_t *>calloc(4 * max(lay.n_pull, 1), sizeof(uint64_t))
        lay.ans_param = <const void **>calloc(max(lay.n_pull, 1), sizeof(void *))
        if lay.ans_map == NULL or lay.ans_param == NULL:
            raise MemoryError()
        lay.free_reqs = []
        lay.free_sendings = []
        self.n_mapped += len(lay.maps)
        cdef list table = <list>self.tables[worker]
        old = table[lay.hash % LAYOUTS]
        if old is not None:
            _drop_layout(<Layout>old)
        table[lay.hash % LAYOUTS] = lay
        if worker == self.new_worker:
            self.new_worker = -1

    def forget_layouts(self):
        """Drop every layout (registered buffers changed: layouts hold their chunks' views)."""
        for table in self.tables:
            for lay in table:
                if lay is not None:
                    _drop_layout(<Layout>lay)
        self.tables = [[None] * LAYOUTS for _ in range(self.n_workers)]

    def pending_header(self):
        """(worker, bytes) of the request of a new layout that stopped the last get_batch, at its ring's head."""
        cdef int w = self.new_worker
        if w < 0:
            return None
        return w, (<char *>self.slots[w * RING_DEPTH + self.head[w]])[:SLOT_SIZE]

    def skip_pending(self):
        """Drop the request of a new layout that could not be decoded (its slot is posted again)."""
        cdef int w = self.new_worker
        if w >= 0:
            self._post(w, self.head[w])
            self.head[w] = (self.head[w] + 1) % RING_DEPTH
            self.new_worker = -1

    def slot_failure(self):
        """(worker, UCX status) of the receive that failed, reported once (its slot is posted again)."""
        cdef tuple out = (self.failed_worker, self.failed_status)
        self.failed_worker = -1
        return out

    # ------------------------------------------------------------ intake
    cdef int _intake(self) except -1:
        """Take in every request that arrived: DONE, NEW_LAYOUT or SLOT_FAILED."""
        cdef int w, k, i, st
        cdef Req r
        for w in range(self.n_workers):
            while True:
                k = self.head[w]
                i = w * RING_DEPTH + k
                if self.rings.h[i] != NULL and not self.rings.settled(self.ucp, i, i + 1):
                    break
                st = self.rings.status[i]
                if st != UCS_OK:
                    self.failed_worker = w
                    self.failed_status = st
                    self._post(w, k)
                    self.head[w] = (k + 1) % RING_DEPTH
                    return R_SLOT_FAILED
                if self._take(w, k) == R_NEW_LAYOUT:
                    self.new_worker = w
                    return R_NEW_LAYOUT
        if self.arriving:
            still = []
            failed = None
            blocked = set()  # workers with an earlier request still arriving: theirs stay in order behind it
            for item in self.arriving:
                r = <Req>item
                if failed is None and r.worker not in blocked and r.ops.settled(self.ucp, 0, r.ops.n):
                    st = r.ops.first_error(0, r.ops.n)
                    if st:
                        failed = r
                        self.failed_worker = r.worker
                        self.failed_status = st
                        continue
                    r.t_recv = now_ns()
                    (<list>self.ready[r.worker]).append(r)
                else:
                    blocked.add(r.worker)
                    still.append(r)
            self.arriving = still
            if failed is not None:
                return R_SLOT_FAILED
        return R_DONE

    cdef int _take(self, int w, int k) except -1:
        cdef uint8_t *buf = self.slots[w * RING_DEPTH + k]
        cdef int size = _header_size(buf)
        if size <= 0:
            return R_NEW_LAYOUT  # Python decodes it and says what is wrong
        cdef uint64_t h = _layout_hash(buf, size)
        cdef object found = (<list>self.tables[w])[h % LAYOUTS]
        if found is None:
            return R_NEW_LAYOUT
        cdef Layout lay = <Layout>found
        if lay.hash != h or lay.size != size or memcmp(<const char *>lay.head, buf, SEQ_OFFSET) != 0 \
                or memcmp(<const char *>lay.head + SEQ_OFFSET + 4, buf + SEQ_OFFSET + 4, size - SEQ_OFFSET - 4) != 0:
            return R_NEW_LAYOUT
        cdef Req r
        if lay.free_reqs:
            r = <Req>lay.free_reqs.pop()
        else:
            r = Req.__new__(Req)
            r.layout = lay
            r.ops = Ops(lay.n_sep_push)
        cdef int i, dev = -1
        cdef PushDest *d
        cdef uint64_t ptr
        r.worker = w
        memcpy(&r.seq, buf + SEQ_OFFSET, 4)
        cdef list tensors = list(lay.views)
        for i in range(lay.n_push):
            if lay.push[i].fresh:
                tensors[i] = self._fresh(lay, i)
        r.tensors = tensors
        r.ops.clear()
        cdef uint64_t bits = self.push_tag[w] | (<uint64_t>r.seq << SEQ_SHIFT)
        for i in range(lay.n_push):  # the large ones first: UCX moves them while the small ones are copied
            d = &lay.push[i]
            if d.placement == SEPARATE or d.placement == LANE:
                ptr = tensors[i].data_ptr() if d.fresh else d.ptr
                r.ops.recv(self.ucp, <void *><uintptr_t>ptr, d.nbytes, bits | <uint64_t>i,
                           self.ucp.mapped_or(d.param, d.dest_device >= 0), d.placement == LANE)
        for i in range(lay.n_push):
            d = &lay.push[i]
            if d.placement != INLINE or not d.nbytes:
                continue
            ptr = tensors[i].data_ptr() if d.fresh else d.ptr
            if d.dest_device >= 0:
                if dev != d.dest_device:
                    if dev >= 0:
                        sync_core_stream(dev)
                    dev = d.dest_device
                    dev_enter(dev)
                _drv_check(drv.h2d(ptr, buf + d.offset, d.nbytes, core_stream(dev)), "copying a push to the device")
            else:
                memcpy(<void *><uintptr_t>ptr, buf + d.offset, d.nbytes)
        if dev >= 0:
            sync_core_stream(dev)  # the slot is posted again below: its bytes must have left
        self._post(w, k)
        self.head[w] = (k + 1) % RING_DEPTH
        if lay.n_sep_push or self.arriving:  # a worker's requests are served in the order it sent them
            self.arriving.append(r)
        else:
            r.t_recv = now_ns()
            (<list>self.ready[w]).append(r)
        return R_DONE

    cdef object _fresh(self, Layout lay, int i):
        if lay.push[i].dest_device >= 0 and lay.alloc_ctx is not None:
            with lay.alloc_ctx:
                return torch_empty(lay.shapes[i], dtype=lay.dtypes[i], device=lay.devices[i])
        return torch_empty(lay.shapes[i], dtype=lay.dtypes[i], device=lay.devices[i])

    # ------------------------------------------------------------ get_batch
    cdef bint _all_ready(self) noexcept:
        cdef int w
        for w in range(self.n_workers):
            if not self.ready[w]:
                return False
        return True

    def get_batch(self, uint64_t spins):
        """Spin at most ``spins`` steps for one complete request from every worker.

        Returns the batch (a list of ``(handle, tensors, keys)`` in worker order),
        or a Result code: PENDING, NEW_LAYOUT (``pending_header``, then
        ``add_layout``), SLOT_FAILED (``slot_failure``) or CLOSED.
        """
        if self.closed:
            return R_CLOSED
        cdef uint64_t i = 0
        cdef unsigned moved
        cdef int rc
        if self.sending:
            self._reap()
        if self.deferred:
            self._kick()
        rc = self._intake()
        while rc == R_DONE and not self._all_ready() and i < spins:
            moved = self.ucp.progress_raw()
            if moved:
                self.ucp.drain()
            if self.deferred:
                self._kick()
            if self.n_flushing:  # a header waits for its answers' puts
                self._reap()
            if moved or (i & 3) == 0:
                rc = self._intake()
            i += 1
        if rc != R_DONE:
            return rc
        if not self._all_ready():
            return R_PENDING
        cdef list batch = []
        cdef Req r
        cdef uint64_t t = now_ns()
        cdef int w
        for w in range(self.n_workers):
            r = <Req>(<list>self.ready[w]).pop(0)
            r.t_proc = t
            r.handle = self.next_handle
            self.next_handle += 1
            self.handles[r.handle] = r
            batch.append((r.handle, r.tensors, list(r.layout.keys)))  # the caller may change its list
        return batch

    # ------------------------------------------------------------- respond
    def respond(self, object tensors, int64_t handle, object need_event):
        """Check, stage and send the answers to request ``handle``: DONE, UNKNOWN or BAD_ANSWER (nothing sent).

        Inline and packed answers are copied (into the response, or into the
        packed buffer), and a host answer to a device pull on the lane into a
        host staging buffer. Device answers that are messages of their own
        (the lane's small ones included) are copied into staging buffers on
        the caller's current stream when ``need_event`` and that stream (the
        first GPU's) still has work, the send then waiting for it; host ones,
        and device ones otherwise, are sent from the caller's memory, lent
        until ``lent`` drops to 0 (the caller waits for that before returning:
        a copy costs more than the transfer).
        """
        cdef object found = self.handles.get(handle)
        if found is None:
            return R_UNKNOWN
        cdef Req r = <Req>found
        cdef Layout lay = r.layout
        if type(tensors) is not list or len(<list>tensors) != lay.n_pull:
            return R_BAD_ANSWER
        cdef list ts = <list>tensors
        cdef int j
        cdef Fact f
        cdef Sending out = <Sending>lay.free_sendings.pop() if lay.free_sendings else new_sending(lay)
        for j in range(lay.n_pull):
            t = ts[j]
            if read_fact(t, &f) < 0 or not f.contig or f.conj:
                lay.free_sendings.append(out)
                return R_BAD_ANSWER
            out.sizes[j] = f.nbytes
            out.ptrs[j] = f.ptr
            out.staged_device[j] = f.device
            out.dev_of[j] = f.device
            if out.sizes[j] > lay.caps[j]:
                lay.free_sendings.append(out)
                return R_BAD_ANSWER
        del self.handles[handle]
        self._answer(r, out, ts, need_event is not False)
        return R_DONE

    cdef int _answer(self, Req r, Sending out, list ts, bint need_event) except -1:
        cdef Layout lay = r.layout
        cdef int j, k, dev, first = -1
        cdef size_t pos = lay.resp_pos
        cdef void *stream = NULL
        cdef bint queued = False  # copies queued on the caller's stream (the send waits for them)
        cdef bint idle = False  # the caller's stream has no work left: a separate device answer is lent, not staged
        cdef bint moved
        cdef uint64_t ptr, n, dst
        cdef uint64_t *sizes = out.sizes
        cdef int *devices = out.staged_device
        cdef uint8_t *hdr = <uint8_t *>lay.resp_pool.get()
        out.req = r
        out.header = hdr
        out.note = None
        out.event = NULL
        out.device = -1
        out.ep = self.eps[r.worker]
        out.pack = NULL
        out.pack_len = 0
        _fill_header(hdr, r.seq, STATUS_OK, lay.n_pull, r.t_recv, r.t_proc)
        for j in range(lay.n_pull):
            memcpy(hdr + RESP_FIXED_SIZE + RESP_SIZE_SIZE * j, &sizes[j], 8)
            out.staged[j] = NULL
            out.params[j] = NULL
        if lay.ans_pack_size:  # on the device of the first packed answer there is (a host one is copied up)
            out.pack_dev = -1
            for j in range(lay.n_pull):
                if lay.placements[j] == PACKED and devices[j] >= 0 and out.pack_dev < 0:
                    out.pack_dev = devices[j]
            out.pack = self._pool(MEM_DEVICE if out.pack_dev >= 0 else MEM_HOST, out.pack_dev, lay.ans_pack_size).get()
        for j in range(lay.n_pull):
            n = sizes[j]
            if n == 0:
                continue
            dev = devices[j]
            ptr = out.ptrs[j]
            if lay.placements[j] == PACKED and dev < 0:  # a host answer: its copy is done before respond returns
                out.pack_len = max(out.pack_len, lay.ans_at[j] + n)
                dst = <uint64_t><uintptr_t>out.pack + lay.ans_at[j]
                if out.pack_dev < 0:
                    memcpy(<void *><uintptr_t>dst, <void *><uintptr_t>ptr, n)
                else:
                    dev_enter(out.pack_dev)
                    _drv_check(drv.h2d(dst, <void *><uintptr_t>ptr, n, core_stream(out.pack_dev)), "packing an answer")
                    sync_core_stream(out.pack_dev)
                continue
            if dev >= 0:
                dev_enter(dev)
                if need_event and first < 0:
                    first = dev
                    idle = drv.stream_query(current_stream(dev)) == DRV_SUCCESS
                stream = current_stream(dev) if need_event and dev == first else core_stream(dev)
            if lay.placements[j] == PACKED:  # a device answer into a pack on the device (the first found)
                out.pack_len = max(out.pack_len, lay.ans_at[j] + n)
                _drv_check(drv.d2d(<uint64_t><uintptr_t>out.pack + lay.ans_at[j], ptr, n, stream), "packing an answer")
                queued = queued or dev == first
                continue
            if lay.placements[j] == INLINE:
                if dev >= 0:
                    _drv_check(drv.d2h(hdr + pos, ptr, n, stream), "staging an answer")
                    queued = queued or dev == first
                else:
                    memcpy(hdr + pos, <void *><uintptr_t>ptr, n)
                pos += n
                continue
            # host, to a device pull on the lane (small), or a written answer that will go as a message after all
            # (a message the worker receives only once it waits for this call): copied, so respond need not wait
            moved = lay.placements[j] == WRITTEN and not puts_into(lay, j, dev >= 0)
            if dev < 0 and (lay.placements[j] == LANE or moved):
                out.staged[j] = self._staging(lay, j, -1).get()
                memcpy(out.staged[j], <void *><uintptr_t>ptr, n)
                continue
            if not moved and (dev < 0 or idle or not need_event):  # sent from the caller's memory, lent until it has left
                out.staged[j] = <void *><uintptr_t>ptr
                out.staged_device[j] = LENT_HOST if dev < 0 else LENT_DEVICE
                out.lends = True
                if dev >= 0:
                    out.params[j] = self._lent_param(lay, j, ts[j], ptr, n)
                continue
            # the caller's stream is still computing: staged behind that work, so that respond returns at once
            out.staged[j] = self._staging(lay, j, dev).get()
            _drv_check(drv.d2d(<uint64_t><uintptr_t>out.staged[j], ptr, n, stream), "staging an answer")
            queued = queued or dev == first
        out.hlen = pos
        dev = -1
        for j in range(lay.n_pull):  # copies on the core's streams: done before the caller may write again
            k = devices[j]
            if sizes[j] and k >= 0 and not (need_event and k == first) and k != dev:
                dev = k
                dev_enter(dev)
                sync_core_stream(dev)
        if first >= 0 and (queued or not idle):  # the send waits for the caller's stream (and the copies on it)
            dev_enter(first)
            out.event = event_take(first)
            out.device = first
            _drv_check(drv.event_record(out.event, current_stream(first)), "recording an event")
        out.in_flight = True
        if out.lends:
            self.lent_out += 1
        if out.event != NULL or self.deferred:
            self.deferred.append(out)
            self._kick()
        else:
            self._post_answer(out)
        return 0

    cdef const void *_lent_param(self, Layout lay, int j, object t, uint64_t ptr, uint64_t n) except? NULL:
        """The param of a mapping of the device memory answer ``j`` is lent from (STEPMESH_MEMORY_HINTS=all, not in
        thread mode), or NULL. The newest mapping serves while the answer lies in it and its allocation is the
        same (``buffer_id``: the layout holds no tensor); otherwise the answer's whole storage is mapped, tried at
        most ANSWER_MAPS times per answer, failures included (each mapping kept as long as the layout: a send may
        still read through it)."""
        cdef uint64_t *at = &lay.ans_map[4 * j]
        cdef uint64_t bid = 0
        if lay.ans_param[j] != NULL and at[0] <= ptr and ptr + n <= at[1]:
            bid = buffer_id(ptr)
            if bid != 0 and bid == at[2]:
                return lay.ans_param[j]
        if drv.kind != 1 or not self.ucp.maps() or at[3] >= ANSWER_MAPS:
            return NULL
        at[3] += 1
        if bid == 0:  # not asked above (the answer lies outside the newest mapping)
            bid = buffer_id(ptr)
        if bid == 0:
            return NULL
        storage = t.untyped_storage()
        cdef uint64_t lo = storage.data_ptr(), hi = lo + storage.nbytes()
        if not (lo <= ptr and ptr + n <= hi):
            return NULL
        cdef object m = self.ucp.map(lo, hi - lo, lay.placements[j] == LANE, None)
        if m is None:
            return NULL
        (<list>lay.ans_maps[j]).append(m)
        at[0] = lo
        at[1] = hi
        at[2] = bid
        lay.ans_param[j] = <const void *>&(<MemMap>m).param[0]
        self.n_lent_mapped += 1
        return lay.ans_param[j]

    cdef Pool _staging(self, Layout lay, int j, int device):
        cdef dict pools = <dict>lay.staging[j]
        cdef object p = pools.get(device)
        if p is None:
            p = pools[device] = self._pool(MEM_DEVICE if device >= 0 else MEM_HOST, device, lay.caps[j])
        return <Pool>p

    cdef Pool _pool(self, int kind, int device, size_t size):
        """The server's pool of buffers of at least ``size`` bytes (shared by every layout: sizes round up to a
        power of two, so that dynamic token counts share a few buffers instead of one set per layout)."""
        cdef size_t cls = 4096
        while cls < size:
            cls <<= 1
        key = (kind, device, cls)
        cdef object p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = Pool(cls, kind, device, 16)
        return <Pool>p

    cdef void _post_answer(self, Sending out) noexcept:
        cdef Layout lay = out.layout
        cdef Req r = out.req
        cdef uint64_t bits = <uint64_t>r.seq << SEQ_SHIFT
        cdef int j
        cdef void *h
        out.ops.clear()
        out.puts.clear()
        out.moved.clear()
        out.header_wait = False
        if lay.n_written and out.note is None:
            for j in range(lay.n_pull):
                if lay.placements[j] != WRITTEN or not out.sizes[j]:
                    continue
                if puts_into(lay, j, from_device(out, j)):
                    h = self.ucp.put_param(out.ep, out.staged[j], out.sizes[j], lay.raddr[j], lay.rkeys[j],
                                           self.ucp.mapped_or(out.params[j], from_device(out, j)))
                    if <uintptr_t>h < ERR_MIN:
                        out.put_of[out.puts.n] = j
                        out.puts.add(h)
                        continue
                self._send_moved(out, j)
            if out.puts.n:  # the header leaves once the puts are complete at the worker (here, or in _reap)
                out.put_of[out.puts.n] = -1
                out.puts.add(self.ucp.flush_ep(out.ep))
                out.header_wait = True
                self.n_flushing += 1
                if out.puts.settled(self.ucp, 0, out.puts.n):
                    self._flushed(out)  # the header goes there
        if not out.puts.n:
            self._send_header(out)
        for j in range(lay.n_pull):
            if lay.placements[j] == SEPARATE or lay.placements[j] == LANE:  # an empty one still completes the receive
                out.ops.add(self.ucp.send_param(
                    self.lane_eps[r.worker] if lay.placements[j] == LANE else out.ep,
                    out.staged[j] if out.staged[j] != NULL else out.header, out.sizes[j],
                    self.pull_tag | bits | <uint64_t>j,
                    self.ucp.mapped_or(out.params[j], out.staged[j] != NULL and from_device(out, j))))
        if lay.ans_pack_size:
            out.ops.add(self.ucp.send_raw(out.ep, out.pack if out.pack != NULL else out.header, out.pack_len,
                                          self.pull_tag | bits | PACK_SLOT, False,
                                          HINT_CUDA if out.pack != NULL and out.pack_dev >= 0 else HINT_HOST))
        self.sending.append(out)

    cdef void _send_header(self, Sending out) noexcept:
        """The response header (and a refusal's reason): stamped, then posted."""
        cdef uint64_t bits = <uint64_t>out.req.seq << SEQ_SHIFT
        cdef uint64_t t = now_ns()
        memcpy(out.header + RESP_STAMPS_AT + 24, &t, 8)
        out.ops.add(self.ucp.send_raw(out.ep, out.header, out.hlen, self.resp_tag | bits, False, HINT_HOST))
        if out.note is not None:
            out.ops.add(self.ucp.send_raw(out.ep, <const char *>out.note, len(out.note),
                                          self.resp_tag | bits | REFUSAL_SLOT, False, HINT_HOST))

    cdef void _send_moved(self, Sending out, int j) noexcept:
        """Send written answer ``j`` as a tag message after all (no key, memory of another kind than the pull
        tensor, or UCX refused the put), and mark its size in the header so that the worker receives it.

        The worker posts that receive only once it waits for this very call, maybe after others: the message
        goes from a copy (``_answer`` made one where it knew; one lent from the caller's memory is copied now),
        never lent, so that respond need not wait for it."""
        cdef uint64_t size = out.sizes[j] | MOVED
        cdef int d = out.dev_of[j]
        cdef uint16_t refused = STATUS_REFUSED
        cdef void *copy = NULL
        if out.staged_device[j] == LENT_HOST or out.staged_device[j] == LENT_DEVICE:
            try:
                copy = (<Pool>self._staging(out.layout, j, d)).get()
                if d < 0:
                    memcpy(copy, out.staged[j], out.sizes[j])
                else:
                    dev_enter(d)
                    _drv_check(drv.d2d(<uint64_t><uintptr_t>copy, <uint64_t><uintptr_t>out.staged[j], out.sizes[j],
                                       core_stream(d)), "copying an answer")
                    sync_core_stream(d)
            except Exception as e:  # the answer cannot go: the worker's call fails with the reason
                if copy != NULL:
                    (<Pool>self._staging(out.layout, j, d)).put(copy)
                out.note = f"the server could not copy answer {j} to send it: {e}".encode()[:REFUSAL_MAX - 1] + b"\0"
                memcpy(out.header + RESP_STATUS_AT, &refused, 2)
                return
            out.staged[j] = copy
            out.staged_device[j] = d
            out.params[j] = NULL
        memcpy(out.header + RESP_FIXED_SIZE + RESP_SIZE_SIZE * j, &size, 8)
        out.moved.add(self.ucp.send_param(out.ep, out.staged[j], out.sizes[j],
                                          self.pull_tag | (<uint64_t>out.req.seq << SEQ_SHIFT) | <uint64_t>j,
                                          self.ucp.mapped_or(out.params[j], d >= 0)))
        self.n_moved += 1

    cdef void _flushed(self, Sending out) noexcept:
        """The puts of ``out`` are done: answers whose put or flush failed go as messages, then the header."""
        cdef int i, j
        cdef bint flush_failed = out.puts.status[out.puts.n - 1] != UCS_OK
        for i in range(out.puts.n - 1):
            j = out.put_of[i]
            if flush_failed or out.puts.status[i] != UCS_OK:
                self._send_moved(out, j)
            else:
                self.n_written_sent += 1
        out.header_wait = False
        self.n_flushing -= 1
        self._send_header(out)

    cdef int _kick(self) except -1:
        cdef Sending out
        cdef int rc
        while self.deferred:
            out = <Sending>self.deferred[0]
            if out.event != NULL:
                rc = drv.event_query(out.event)
                if rc == DRV_NOT_READY:
                    return 0
                event_give(out.device, out.event)
                out.event = NULL
                _drv_check(rc, "waiting for the caller's stream")
            self.deferred.pop(0)
            self._post_answer(out)
        return 0

    cdef void _reap(self) noexcept:
        cdef list still = []
        cdef Sending out
        cdef Layout lay
        cdef Req r
        cdef int j
        for item in self.sending:
            out = <Sending>item
            if out.header_wait:
                if out.puts.settled(self.ucp, 0, out.puts.n):
                    self._flushed(out)
                still.append(out)
                continue
            if not out.ops.settled(self.ucp, 0, out.ops.n):
                still.append(out)
                continue
            if out.lends:  # what was lent has left (moved answers go from copies)
                out.lends = False
                self.lent_out -= 1
            if not out.moved.settled(self.ucp, 0, out.moved.n):
                still.append(out)
                continue
            lay = out.layout
            lay.resp_pool.put(out.header)
            for j in range(lay.n_pull):
                if out.staged[j] != NULL and out.staged_device[j] >= -1:
                    (<Pool>(<dict>lay.staging[j])[out.staged_device[j]]).put(out.staged[j])
                out.staged[j] = NULL
            if out.pack != NULL:
                self._pool(MEM_DEVICE if out.pack_dev >= 0 else MEM_HOST, out.pack_dev, lay.ans_pack_size).put(out.pack)
                out.pack = NULL
            r = out.req
            out.req = None
            out.in_flight = False
            r.tensors = None  # the request's tensors go now that its answer has left
            if not lay.evicted:
                lay.free_sendings.append(out)
                lay.free_reqs.append(r)
        self.sending = still

    def refuse(self, int64_t handle, str reason):
        """Tell the worker at once why request ``handle`` gets no answer (its pull tensors stay untouched)."""
        cdef object found = self.handles.pop(handle, None)
        if found is None:
            return R_UNKNOWN
        cdef Req r = <Req>found
        cdef Layout lay = r.layout
        cdef Sending out = <Sending>lay.free_sendings.pop() if lay.free_sendings else new_sending(lay)
        cdef int j
        out.req = r
        out.header = <uint8_t *>lay.resp_pool.get()
        out.hlen = lay.resp_pos
        out.event = NULL
        out.device = -1
        out.ep = self.eps[r.worker]
        out.note = reason.encode("utf-8")[:REFUSAL_MAX - 1] + b"\0"
        out.pack = NULL
        out.pack_len = 0
        _fill_header(out.header, r.seq, STATUS_REFUSED, lay.n_pull, r.t_recv, r.t_proc)
        for j in range(lay.n_pull):
            out.sizes[j] = 0
            out.staged[j] = NULL
            out.params[j] = NULL
            memcpy(out.header + RESP_FIXED_SIZE + RESP_SIZE_SIZE * j, &out.sizes[j], 8)
        out.in_flight = True
        if self.deferred:
            self.deferred.append(out)
            self._kick()
        else:
            self._post_answer(out)
        return R_DONE

    def progress(self):
        """Send held-back answers whose stream work completed and reap the delivered; how many are not yet delivered."""
        cdef unsigned moved = self.ucp.progress_raw()
        if moved:
            self.ucp.drain()
        if self.deferred:
            self._kick()
        self._reap()
        return len(self.deferred) + len(self.sending)

    def request_info(self, int64_t handle):
        """(push keys, [(pull key, capacity) of each answer]) of a request taken by get_batch and not answered; or None."""
        cdef object found = self.handles.get(handle)
        if found is None:
            return None
        cdef Layout lay = (<Req>found).layout
        cdef int j
        return lay.keys, [(lay.pull_keys[j], lay.caps[j]) for j in range(lay.n_pull)]

    @property
    def mapped(self):
        """Registered chunks mapped with ``ucp_mem_map`` for the layouts made so far (each layout maps its own)."""
        return self.n_mapped

    @property
    def lent_mapped(self):
        """Mappings made so far of the device memory answers were lent from (at most ANSWER_MAPS per answer of a
        layout)."""
        return self.n_lent_mapped

    @property
    def lent(self):
        """Answers in flight that UCX reads from the caller's memory (lent: sent without a copy)."""
        return self.lent_out

    @property
    def waiting_for_stream(self):
        """Answers held back until their stream work completes, or until their puts do (UCX may not wake a
        blocking progress for either: the caller polls while there are any)."""
        return len(self.deferred) + self.n_flushing

    @property
    def written(self):
        """(answers put into the workers' pull tensors, written answers sent as messages instead) so far."""
        return self.n_written_sent, self.n_moved

    def close(self):
        """Cancel the ring receives and everything in flight; the memory they use is left to UCX."""
        self.closed = True
        self.rings.abandon(self.ucp)
        for item in self.arriving:
            if (<Req>item).ops.abandon(self.ucp):
                _LEFT_TO_UCX.append((<Req>item).tensors)  # pushes UCX matched write on into them
                for m in (<Req>item).layout.maps:
                    (<MemMap>m).leave_to_ucx()
        cdef bint abandoned
        for item in self.sending:
            abandoned = (<Sending>item).ops.abandon(self.ucp)
            abandoned = (<Sending>item).moved.abandon(self.ucp) or abandoned
            if (<Sending>item).puts.abandon(self.ucp):  # puts run on: their layout's keys are never destroyed
                abandoned = True
                _LEFT_TO_UCX.append((<Sending>item).layout)
            if abandoned:
                for maps in (<Sending>item).layout.ans_maps:
                    for m in maps:
                        (<MemMap>m).leave_to_ucx()
        self.arriving = []
        self.sending = []
        self.deferred = []
        self.lent_out = 0
        self.n_flushing = 0
        self.handles.clear()
        self.forget_layouts()


cdef void _drop_layout(Layout lay) noexcept:
    lay.evicted = 1
    lay.free_reqs = []
    lay.free_sendings = []


cdef void _fill_header(uint8_t *hdr, uint32_t seq, uint16_t status, uint16_t n, uint64_t t_recv,
                       uint64_t t_proc) noexcept:
    cdef uint64_t t = now_ns()
    hdr[0] = DATA_VERSION
    hdr[1] = 0
    memcpy(hdr + RESP_STATUS_AT, &status, 2)
    memcpy(hdr + RESP_N_AT, &n, 2)
    memcpy(hdr + RESP_SEQ_AT, &seq, 4)
    memcpy(hdr + RESP_STAMPS_AT, &t_recv, 8)
    memcpy(hdr + RESP_STAMPS_AT + 8, &t_proc, 8)
    memcpy(hdr + RESP_STAMPS_AT + 16, &t, 8)
    memcpy(hdr + RESP_STAMPS_AT + 24, &t, 8)


cdef int _header_size(const uint8_t *buf) noexcept:
    """The size of the request header in ``buf`` from its counts and dimensions; 0 when it is malformed."""
    cdef uint16_t n_push, n_servers, per, klen
    cdef int i, pulls_at, pos = REQ_FIXED_SIZE
    cdef uint8_t ndim
    if buf[0] != DATA_VERSION:
        return 0
    memcpy(&n_push, buf + 2, 2)
    memcpy(&n_servers, buf + 4, 2)
    memcpy(&per, buf + 6, 2)
    if n_push > MAX_TENSORS or <int>n_servers * per > MAX_PULLS:
        return 0
    for i in range(n_push):
        if pos + REQ_TENSOR_SIZE > HEADER_MAX:
            return 0
        ndim = buf[pos + 9]
        if ndim > MAX_NDIM:
            return 0
        pos += REQ_TENSOR_SIZE + REQ_DIM_SIZE * ndim
    pulls_at = pos
    pos += REQ_PULL_SIZE * n_servers * per
    if pos > HEADER_MAX:
        return 0
    for i in range(<int>n_servers * per):  # the written pulls' keys follow the pulls
        if buf[pulls_at + REQ_PULL_SIZE * i + 16] == WRITTEN:
            if pos + REQ_WRITTEN_SIZE > HEADER_MAX:
                return 0
            memcpy(&klen, buf + pos + 8, 2)
            pos += REQ_WRITTEN_SIZE + klen
            if pos > HEADER_MAX:
                return 0
    return pos


cdef uint64_t _layout_hash(const uint8_t *buf, int size) noexcept:
    """FNV-1a over a header's bytes, the sequence number aside."""
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(size):
        if SEQ_OFFSET <= i < SEQ_OFFSET + 4:
            continue
        h = (h ^ buf[i]) * 1099511628211ULL
    return h


def header_size(bytes buf):
    """The size the core reads off a request header in ``buf`` (a slot's bytes); 0 when malformed."""
    if len(buf) < SLOT_SIZE:
        raise ValueError(f"a slot holds {SLOT_SIZE} bytes, got {len(buf)}")
    return _header_size(<const uint8_t *><const char *>buf)


def constants():
    """The wire constants this core was built with (checked against stepmesh.data.wire at import)."""
    return dict(_CONSTANTS)
