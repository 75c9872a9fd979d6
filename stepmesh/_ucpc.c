/* Tag sends and receives on a ucxx worker, in C: stepmesh._ucp's TagOps and
 * Request without ctypes.
 *
 * The same calls as the ctypes version (ucp_tag_send_nbx, ucp_tag_recv_nbx,
 * ucp_request_check_status, ...), reached through the function addresses that
 * stepmesh._ucp resolved in the libucp ucxx loaded, so nothing here links
 * against UCX or needs its headers. A call costs tens of nanoseconds instead
 * of ctypes' argument conversion (half a microsecond to a microsecond), and a
 * poll of a request allocates nothing.
 *
 * Optional: stepmesh._ucp falls back to its ctypes classes when this module
 * was not built. Both behave alike, and the tests run both.
 */
#include "_ucpc.h"

#include <time.h>

#define FIELD_DATATYPE (1u << 3) /* UCP_OP_ATTR_FIELD_DATATYPE */
#define DATATYPE_WORD 3          /* offsetof(ucp_request_param_t, datatype) / 8 */
#define DATATYPE_IOV 2           /* UCP_DATATYPE_IOV */

smc_send_fn smc_ucp_send;
smc_recv_fn smc_ucp_recv;
smc_check_fn smc_ucp_check;
smc_free_fn smc_ucp_free;
smc_cancel_fn smc_ucp_cancel;
smc_progress_fn smc_ucp_progress;
PyObject *smc_on_refused;
PyObject *smc_on_failed;
PyObject *smc_tensor_type;
PyObject *smc_dtypes;
PyObject *smc_str_data_ptr, *smc_str_is_contiguous, *smc_str_nbytes, *smc_str_is_cuda, *smc_str_dtype, *smc_str_shape;

#define ucp_send smc_ucp_send
#define ucp_recv smc_ucp_recv
#define ucp_check smc_ucp_check
#define ucp_free smc_ucp_free
#define ucp_cancel smc_ucp_cancel
#define ucp_progress smc_ucp_progress
#define on_refused smc_on_refused
#define on_failed smc_on_failed
#define ERR_MIN SMC_ERR_MIN
#define PARAM_WORDS SMC_PARAM_WORDS
#define TagOpsType SmcTagOpsType

static PyTypeObject RequestType;

static void unlink_request(RequestObject *r) {
    TagOpsObject *ops = r->ops;
    r->prev->next = r->next;
    r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->ops = NULL;
    ops->n_live--;
    Py_DECREF(r);
}

/* ------------------------------------------------------------------ Request */

uint64_t smc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* 1 once complete (the UCX request is then freed and the request unlinked), else 0. */
static int observe(RequestObject *self) {
    void *h = self->h;
    if (h == NULL)
        return 1;
    int status = smc_poll(self->ops, h);
    if (status == UCS_INPROGRESS)
        return 0;
    self->status = status;
    self->h = NULL;
    self->t_done = smc_now_ns();
    unlink_request(self); /* the caller still holds a reference */
    return 1;
}

static PyObject *Request_completed(RequestObject *self, void *closure) { return PyBool_FromLong(observe(self)); }

static PyObject *Request_status(RequestObject *self, void *closure) { return PyLong_FromLong(self->status); }

static PyObject *Request_t_done(RequestObject *self, void *closure) { return PyLong_FromUnsignedLongLong(self->t_done); }

/* Raise through ``callback(status)`` (stepmesh._ucp's, which raises UcpError with UCX's text). */
PyObject *smc_raise_status(PyObject *callback, long status) {
    PyObject *arg = PyLong_FromLong(status);
    if (arg == NULL)
        return NULL;
    PyObject *res = PyObject_CallOneArg(callback, arg);
    Py_DECREF(arg);
    if (res != NULL) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_RuntimeError, "stepmesh._ucpc: the status callback did not raise");
    }
    return NULL;
}

static PyObject *Request_check_error(RequestObject *self, PyObject *unused) {
    if (self->status == 0)
        Py_RETURN_NONE;
    return smc_raise_status(on_failed, self->status);
}

static PyGetSetDef Request_getset[] = {
    {"completed", (getter)Request_completed, NULL, "True once the operation is complete (its UCX request is then freed).", NULL},
    {"status", (getter)Request_status, NULL, "Its ucs_status_t once complete (0: OK).", NULL},
    {"t_done", (getter)Request_t_done, NULL,
     "time.monotonic_ns() when it was seen complete; 0 when it completed within its call.", NULL},
    {NULL},
};

static PyMethodDef Request_methods[] = {
    {"check_error", (PyCFunction)Request_check_error, METH_NOARGS, "Raise UcpError if the operation failed."},
    {NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One tag operation in flight; completed turns True once, and then the UCX request is freed.",
    .tp_getset = Request_getset,
    .tp_methods = Request_methods,
};

/* ------------------------------------------------------------------- TagOps */

/* The Request for what a send/recv call returned (a request, NULL when done, or an error status). */
static PyObject *wrap_result(TagOpsObject *self, void *h) {
    if (h == NULL) {
        Py_INCREF(self->done);
        return (PyObject *)self->done;
    }
    if ((uintptr_t)h >= ERR_MIN) {
        return smc_raise_status(on_refused, (long)(intptr_t)h);
    }
    RequestObject *r = PyObject_New(RequestObject, &RequestType);
    if (r == NULL) {
        ucp_cancel(self->worker, h);
        ucp_free(h);
        return NULL;
    }
    r->h = h;
    r->status = 0;
    r->t_done = 0;
    r->ops = self;
    r->prev = self->live.prev; /* the list owns one reference, the caller the other */
    r->next = &self->live;
    self->live.prev->next = r;
    self->live.prev = r;
    self->n_live++;
    Py_INCREF(r);
    return (PyObject *)r;
}

int smc_as_u64(PyObject *o, uint64_t *out, const char *name) {
    unsigned long long v = PyLong_Check(o) ? PyLong_AsUnsignedLongLong(o) : (unsigned long long)-1;
    if (v == (unsigned long long)-1 && (PyErr_Occurred() || !PyLong_Check(o))) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a non-negative int below 2**64", name);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

int smc_u64_tuple(PyObject *item, uint64_t *out, Py_ssize_t n, const char *what) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != n) {
        PyErr_Format(PyExc_TypeError, "%s: expected a tuple of %zd ints", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (smc_as_u64(PyTuple_GET_ITEM(item, i), &out[i], what) < 0)
            return -1;
    return 0;
}

int smc_u64_rows(PyObject *list, Py_ssize_t n, uint64_t **out, Py_ssize_t *n_out, const char *what) {
    if (!PyList_Check(list)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list", what);
        return -1;
    }
    Py_ssize_t rows = PyList_GET_SIZE(list);
    *n_out = rows;
    if ((*out = PyMem_Calloc(rows ? rows * n : 1, sizeof(uint64_t))) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (n == 1 ? smc_as_u64(item, *out + i, what) < 0 : smc_u64_tuple(item, *out + i * n, n, what) < 0)
            return -1;
    }
    return 0;
}

int smc_read_tensor(PyObject *t, SmcTensor *out, int shape) {
    if (!PyObject_TypeCheck(t, (PyTypeObject *)smc_tensor_type))
        return -1;
    PyObject *v = PyObject_CallMethodNoArgs(t, smc_str_data_ptr);
    if (v == NULL)
        goto fail;
    out->ptr = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred() || (v = PyObject_GetAttr(t, smc_str_nbytes)) == NULL)
        goto fail;
    out->nbytes = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred() || (v = PyObject_CallMethodNoArgs(t, smc_str_is_contiguous)) == NULL)
        goto fail;
    out->contig = v == Py_True;
    Py_DECREF(v);
    if ((v = PyObject_GetAttr(t, smc_str_is_cuda)) == NULL)
        goto fail;
    out->cuda = v == Py_True;
    Py_DECREF(v);
    if ((v = PyObject_GetAttr(t, smc_str_dtype)) == NULL)
        goto fail;
    out->dtype = v; /* a torch dtype: lives as long as torch */
    Py_DECREF(v);
    out->ndim = 0;
    if (shape) {
        if ((v = PyObject_GetAttr(t, smc_str_shape)) == NULL)
            goto fail;
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) > SMC_MAX_NDIM) {
            Py_DECREF(v);
            return -1;
        }
        out->ndim = (int)PyTuple_GET_SIZE(v);
        for (int d = 0; d < out->ndim && !PyErr_Occurred(); d++)
            out->dims[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(v, d));
        Py_DECREF(v);
    }
    if (PyErr_Occurred())
        goto fail;
    return 0;
fail:
    PyErr_Clear();
    return -1;
}

int smc_ready(TagOpsObject *self) {
    if (self->worker_obj == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TagOps was not initialised (call TagOps(worker, handle))");
        return -1;
    }
    return 0;
}

static int check_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi) {
    if (nargs < lo || nargs > hi) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", fn, lo, hi, nargs);
        return -1;
    }
    return 0;
}

static int iov_of(PyObject *iov, uint64_t *ptr, uint64_t *count) {
    PyObject *p = PyObject_GetAttrString(iov, "ptr");
    if (p == NULL)
        return -1;
    PyObject *c = PyObject_GetAttrString(iov, "count");
    if (c == NULL) {
        Py_DECREF(p);
        return -1;
    }
    int rc = smc_as_u64(p, ptr, "iov.ptr") || smc_as_u64(c, count, "iov.count") ? -1 : 0;
    Py_DECREF(p);
    Py_DECREF(c);
    return rc;
}

static PyObject *TagOps_send(TagOpsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t ep, ptr, n, tag;
    if (smc_ready(self) || check_nargs("send", nargs, 4, 4) || smc_as_u64(args[0], &ep, "ep") || smc_as_u64(args[1], &ptr, "ptr") ||
        smc_as_u64(args[2], &n, "nbytes") || smc_as_u64(args[3], &tag, "tag"))
        return NULL;
    return wrap_result(self, smc_send(self, ep, ptr, n, tag, 0));
}

static PyObject *TagOps_recv(TagOpsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t ptr, n, tag, mask = UINT64_MAX;
    if (smc_ready(self) || check_nargs("recv", nargs, 3, 4) || smc_as_u64(args[0], &ptr, "ptr") || smc_as_u64(args[1], &n, "nbytes") ||
        smc_as_u64(args[2], &tag, "tag") || (nargs > 3 && smc_as_u64(args[3], &mask, "mask")))
        return NULL;
    return wrap_result(self, smc_recv(self, ptr, n, tag, mask, 0));
}

static PyObject *TagOps_send_iov(TagOpsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t ep, ptr, count, tag;
    if (smc_ready(self) || check_nargs("send_iov", nargs, 3, 3) || smc_as_u64(args[0], &ep, "ep") || iov_of(args[1], &ptr, &count) ||
        smc_as_u64(args[2], &tag, "tag"))
        return NULL;
    return wrap_result(self, smc_send(self, ep, ptr, count, tag, 1));
}

static PyObject *TagOps_recv_iov(TagOpsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t ptr, count, tag, mask = UINT64_MAX;
    if (smc_ready(self) || check_nargs("recv_iov", nargs, 2, 3) || iov_of(args[0], &ptr, &count) || smc_as_u64(args[1], &tag, "tag") ||
        (nargs > 2 && smc_as_u64(args[2], &mask, "mask")))
        return NULL;
    return wrap_result(self, smc_recv(self, ptr, count, tag, mask, 1));
}

static PyObject *TagOps_cancel(TagOpsObject *self, PyObject *r) {
    if (!PyObject_TypeCheck(r, &RequestType)) {
        PyErr_Format(PyExc_TypeError, "cancel() takes a Request, got %s", Py_TYPE(r)->tp_name);
        return NULL;
    }
    RequestObject *req = (RequestObject *)r;
    if (req->h != NULL && req->ops == self)
        ucp_cancel(self->worker, req->h);
    Py_RETURN_NONE;
}

/* Run ``stmt`` (a libucp call) with the GIL let go when another thread may progress the worker. */
#define UNLOCKED(ops, stmt)                                                                                            \
    do {                                                                                                               \
        if ((ops)->release_gil) {                                                                                      \
            Py_BEGIN_ALLOW_THREADS stmt;                                                                               \
            Py_END_ALLOW_THREADS                                                                                       \
        } else {                                                                                                       \
            stmt;                                                                                                      \
        }                                                                                                              \
    } while (0)

static unsigned progress_once(TagOpsObject *self) {
    unsigned n;
    UNLOCKED(self, n = ucp_progress(self->worker));
    return n;
}

/* ------------------------------------------------ raw calls for the cores */

void *smc_send(TagOpsObject *ops, uint64_t ep, uint64_t buf, uint64_t count, uint64_t tag, int iov) {
    const void *param = iov ? ops->iov_param : ops->param;
    void *h;
    UNLOCKED(ops, h = ucp_send((void *)(uintptr_t)ep, (const void *)(uintptr_t)buf, (size_t)count, tag, param));
    return h;
}

void *smc_recv(TagOpsObject *ops, uint64_t buf, uint64_t count, uint64_t tag, uint64_t mask, int iov) {
    const void *param = iov ? ops->iov_param : ops->param;
    void *h;
    UNLOCKED(ops, h = ucp_recv(ops->worker, (void *)(uintptr_t)buf, (size_t)count, tag, mask, param));
    return h;
}

static int check_and_free(void *h) {
    int status = ucp_check(h);
    if (status != UCS_INPROGRESS)
        ucp_free(h);
    return status;
}

int smc_poll(TagOpsObject *ops, void *h) {
    int status;
    UNLOCKED(ops, status = check_and_free(h));
    return status;
}

void smc_cancel(TagOpsObject *ops, void *h) { ucp_cancel(ops->worker, h); }

unsigned smc_progress(TagOpsObject *ops) { return progress_once(ops); }

int smc_spin(TagOpsObject *ops, uint64_t spins, int (*settled)(void *), void *arg) {
    int done = settled(arg);
    for (uint64_t i = 0; i < spins && done == 0; i++) {
        unsigned moved = progress_once(ops);
        if (moved)
            while (progress_once(ops))
                ;
        /* UCX reports a CUDA copy's completion through progress; still, look every 4th idle spin */
        if (moved || !(i & 3))
            done = settled(arg);
    }
    return done;
}

static PyObject *TagOps_progress(TagOpsObject *self, PyObject *unused) {
    if (smc_ready(self))
        return NULL;
    return PyLong_FromUnsignedLong(progress_once(self));
}

/* Whether all (or, with ``any``, at least one) of the requests of ``seq`` (a list or tuple) are
   complete. Waiting for all, every one is looked at, so that each gets its own t_done. */
static int settled(PyObject *seq, int any) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int all = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (observe((RequestObject *)items[i])) {
            if (any)
                return 1;
        } else {
            all = 0;
        }
    }
    return all;
}

typedef struct {
    PyObject *seq;
    int any;
} WaitArgs;

static int wait_settled(void *arg) {
    WaitArgs *wa = arg;
    return settled(wa->seq, wa->any);
}

static PyObject *TagOps_wait(TagOpsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t spins;
    if (smc_ready(self) || check_nargs("wait", nargs, 2, 3) || smc_as_u64(args[1], &spins, "spins"))
        return NULL;
    PyObject *list = args[0];
    if (!PyList_CheckExact(list)) {
        PyErr_Format(PyExc_TypeError, "wait() takes a list of Request, got %s", Py_TYPE(list)->tp_name);
        return NULL;
    }
    int any = nargs > 2 ? PyObject_IsTrue(args[2]) : 0; /* first: a __bool__ could change the list */
    if (any < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        if (Py_TYPE(PyList_GET_ITEM(list, i)) != &RequestType) {
            PyErr_Format(PyExc_TypeError, "wait(): item %zd is a %s, not a Request", i,
                         Py_TYPE(PyList_GET_ITEM(list, i))->tp_name);
            return NULL;
        }
    }
    /* Nothing here runs Python code (observing a request calls libucp and drops a
       reference that the caller's list doubles), so the list cannot change while
       this runs; unless the GIL is let go around UCX: then a copy is walked. */
    PyObject *seq = self->release_gil ? PyList_AsTuple(list) : Py_NewRef(list);
    if (seq == NULL)
        return NULL;
    WaitArgs wa = {seq, any};
    int done = smc_spin(self, spins, wait_settled, &wa);
    if (!done)
        done = settled(seq, any);
    Py_DECREF(seq);
    return PyBool_FromLong(done);
}

static void close_all(TagOpsObject *self) {
    while (self->live.next != &self->live) {
        RequestObject *r = self->live.next;
        void *h = r->h;
        r->h = NULL;
        r->status = UCS_ERR_CANCELED;
        r->t_done = smc_now_ns();
        ucp_cancel(self->worker, h);
        ucp_free(h);
        unlink_request(r);
    }
}

static PyObject *TagOps_close(TagOpsObject *self, PyObject *unused) {
    if (self->worker_obj != NULL)
        close_all(self);
    Py_RETURN_NONE;
}

static PyObject *TagOps_in_flight(TagOpsObject *self, void *closure) { return PyLong_FromSsize_t(self->n_live); }

static int TagOps_init(TagOpsObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"worker", "handle", "release_gil", NULL};
    PyObject *worker_obj;
    unsigned long long handle;
    int release_gil = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OK|p", kwlist, &worker_obj, &handle, &release_gil))
        return -1;
    if (ucp_send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "stepmesh._ucpc.bind() was not called");
        return -1;
    }
    if (self->worker_obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TagOps is already initialised");
        return -1;
    }
    self->done = PyObject_New(RequestObject, &RequestType);
    if (self->done == NULL)
        return -1;
    self->done->h = NULL;
    self->done->status = 0;
    self->done->t_done = 0;
    self->done->ops = NULL;
    self->done->prev = self->done->next = NULL;
    Py_INCREF(worker_obj);
    self->worker_obj = worker_obj;
    self->worker = (void *)(uintptr_t)handle;
    self->release_gil = release_gil;
    memset(self->param, 0, sizeof(self->param));
    memset(self->iov_param, 0, sizeof(self->iov_param));
    self->iov_param[0] = FIELD_DATATYPE; /* op_attr_mask (uint32 at offset 0, little-endian) */
    self->iov_param[DATATYPE_WORD] = DATATYPE_IOV;
    self->live.prev = self->live.next = &self->live;
    self->n_live = 0;
    return 0;
}

static void TagOps_dealloc(TagOpsObject *self) {
    if (self->worker_obj != NULL)
        close_all(self);
    Py_XDECREF(self->done);
    Py_XDECREF(self->worker_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef TagOps_methods[] = {
    {"send", (PyCFunction)(void (*)(void))TagOps_send, METH_FASTCALL, "send(ep, ptr, nbytes, tag) -> Request"},
    {"recv", (PyCFunction)(void (*)(void))TagOps_recv, METH_FASTCALL, "recv(ptr, nbytes, tag, mask=FULL) -> Request"},
    {"send_iov", (PyCFunction)(void (*)(void))TagOps_send_iov, METH_FASTCALL, "send_iov(ep, iov, tag) -> Request"},
    {"recv_iov", (PyCFunction)(void (*)(void))TagOps_recv_iov, METH_FASTCALL, "recv_iov(iov, tag, mask=FULL) -> Request"},
    {"cancel", (PyCFunction)TagOps_cancel, METH_O, "Cancel a request still in flight."},
    {"progress", (PyCFunction)TagOps_progress, METH_NOARGS, "One ucp_worker_progress; non-zero when anything moved."},
    {"wait", (PyCFunction)(void (*)(void))TagOps_wait, METH_FASTCALL,
     "wait(reqs: list[Request], spins, any=False) -> bool: busy-poll the worker until all (any) of reqs are "
     "complete, for at most ``spins`` progress calls."},
    {"close", (PyCFunction)TagOps_close, METH_NOARGS, "Cancel and release every operation still in flight."},
    {NULL},
};

static PyGetSetDef TagOps_getset[] = {
    {"in_flight", (getter)TagOps_in_flight, NULL, "Operations posted and not yet seen complete.", NULL},
    {NULL},
};

PyTypeObject SmcTagOpsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.TagOps",
    .tp_basicsize = sizeof(TagOpsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TagOps(worker, handle, release_gil=False): tag operations on a ucxx worker, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)TagOps_init,
    .tp_dealloc = (destructor)TagOps_dealloc,
    .tp_methods = TagOps_methods,
    .tp_getset = TagOps_getset,
};

/* ------------------------------------------------------------------- module */

static PyObject *bind(PyObject *module, PyObject *args) {
    unsigned long long fns[6];
    PyObject *refused, *failed;
    if (!PyArg_ParseTuple(args, "(KKKKKK)OO", &fns[0], &fns[1], &fns[2], &fns[3], &fns[4], &fns[5], &refused, &failed))
        return NULL;
    for (int i = 0; i < 6; i++) {
        if (fns[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "bind(): a libucp function address is 0");
            return NULL;
        }
    }
    ucp_send = (smc_send_fn)(uintptr_t)fns[0];
    ucp_recv = (smc_recv_fn)(uintptr_t)fns[1];
    ucp_check = (smc_check_fn)(uintptr_t)fns[2];
    ucp_free = (smc_free_fn)(uintptr_t)fns[3];
    ucp_cancel = (smc_cancel_fn)(uintptr_t)fns[4];
    ucp_progress = (smc_progress_fn)(uintptr_t)fns[5];
    Py_INCREF(refused);
    Py_XSETREF(on_refused, refused);
    Py_INCREF(failed);
    Py_XSETREF(on_failed, failed);
    Py_RETURN_NONE;
}

static PyObject *bind_torch(PyObject *module, PyObject *args) {
    PyObject *tensor_type, *dtypes;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &tensor_type, &PyDict_Type, &dtypes))
        return NULL;
    Py_INCREF(tensor_type);
    Py_XSETREF(smc_tensor_type, tensor_type);
    Py_INCREF(dtypes);
    Py_XSETREF(smc_dtypes, dtypes);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind_torch", bind_torch, METH_VARARGS,
     "bind_torch(torch.Tensor, {dtype: wire code}): what the worker and server cores check tensors against."},
    {"bind", bind, METH_VARARGS,
     "bind((send, recv, check_status, free, cancel, progress), on_refused, on_failed): the libucp function "
     "addresses, and the callables that raise for a refused and a failed operation."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "stepmesh._ucpc",
    "Tag operations on a ucxx worker, and the steady state of push_pull and of serving, in C (see stepmesh._ucp).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__ucpc(void) {
    if (PyType_Ready(&RequestType) < 0 || PyType_Ready(&TagOpsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    smc_str_data_ptr = PyUnicode_InternFromString("data_ptr");
    smc_str_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    smc_str_nbytes = PyUnicode_InternFromString("nbytes");
    smc_str_is_cuda = PyUnicode_InternFromString("is_cuda");
    smc_str_dtype = PyUnicode_InternFromString("dtype");
    smc_str_shape = PyUnicode_InternFromString("shape");
    if (!smc_str_data_ptr || !smc_str_is_contiguous || !smc_str_nbytes || !smc_str_is_cuda || !smc_str_dtype ||
        !smc_str_shape ||
        PyModule_AddObjectRef(m, "Request", (PyObject *)&RequestType) < 0 ||
        PyModule_AddObjectRef(m, "TagOps", (PyObject *)&TagOpsType) < 0 || smc_add_worker_types(m) < 0 ||
        smc_add_server_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
