/* The steady state of a server's get_batch and respond, in C.
 *
 * Each worker has a ring of posted receives for its request headers (the
 * slots' memory is stepmesh.server's). A header laid out like a recent one of
 * that worker (only the sequence number differs; StepMesh traffic repeats one
 * layout per micro-batch stage) is taken in here: its pushes' receives are
 * posted straight into their registered chunks and inline pushes copied
 * there. Anything else calls back into stepmesh.server: a header never seen
 * is decoded there (it returns the Layout to remember), and a layout whose
 * pushes need fresh memory or device copies has its tensors made there.
 *
 * respond() checks the answers (tensors, contiguous, known dtypes, within the
 * worker's buffers), packs the response header with the small answers copied
 * in and sends it, then each large answer as its own message. Anything it
 * does not take on (bad input, small answers in device memory) it leaves to
 * Python before anything is sent.
 *
 * Wire layout: stepmesh.protocol, as in _ucpc_worker.c.
 */
#include "_ucpc.h"

#include <stdlib.h>

#define SEQ_OFFSET 8
#define SEQ_SHIFT 16
#define RESP_FIXED 42

enum { RESPOND_SENT = 0, RESPOND_UNKNOWN, RESPOND_CHECK, RESPOND_PYTHON };

typedef struct {
    uint64_t i, ptr, n; /* push i comes as its own message, into ptr (0: the request's tensors[i]) */
} Sep;

typedef struct {
    uint64_t dst, pos, n; /* an inline push at pos in the slot, copied to dst */
} Move;

typedef struct {
    PyObject_HEAD
    PyObject *obj;  /* stepmesh.server._Layout */
    PyObject *keys; /* the push keys, handed out with every request */
    PyObject *dest; /* the registered chunk views (copied per request), unless fill */
    int fill;       /* stepmesh.server makes each request's tensors (fresh memory, device copies) */
    uint8_t *head;  /* the header's bytes (the sequence number's are not compared) */
    uint64_t hash;  /* of those bytes but the sequence number's */
    Py_ssize_t size, n_tensors, n_sep, n_moves, n_pulls;
    Sep *sep;
    Move *moves;
    uint64_t *caps;
    uint8_t *small; /* per answer: travels inside the response header */
    uint64_t resp_pos;
} LayoutObject;

typedef struct RequestObject2 {
    PyObject_HEAD
    struct RequestObject2 *next;
    LayoutObject *lay;
    PyObject *tensors;
    Py_ssize_t worker;
    uint32_t seq;
    int64_t handle;
    uint64_t t_recv, t_proc;
    Py_ssize_t n_open;
    void **req; /* the separate pushes' receives, NULL once complete */
    int *status;
} ServeRequestObject;

typedef struct {
    void *h;
    uint8_t *buf;   /* a response header buffer of the pool, or NULL */
    PyObject *keep; /* a large answer's tensor, or NULL */
} Send;

typedef struct {
    ServeRequestObject *head, *tail;
    Py_ssize_t n;
} Queue;

typedef struct {
    PyObject_HEAD
    TagOpsObject *ops;
    PyObject *handles;    /* dict: handle -> ServeRequest (stepmesh.server reads it too) */
    PyObject *new_layout; /* callable(w, k, status) -> Layout: slot k of worker w holds a header not seen lately */
    PyObject *fill;       /* callable(w, k, layout) -> tensors of a request whose layout has fill set */
    Py_ssize_t n_workers, depth, slot_size, keep; /* keep: layout slots per worker, a power of two */
    uint64_t mask, resp_tag, pull_tag;
    int data_version;
    uint64_t *eps, *ring_tags, *push_tags, *slot_buf; /* slot_buf: n_workers x depth */
    void **slot_req;
    int *slot_status;
    Py_ssize_t *ring;   /* per worker, depth slot indexes in the order posted */
    Py_ssize_t *head, *count;
    Py_ssize_t *spare; /* per worker, slot indexes to post again */
    Py_ssize_t *n_spare;
    LayoutObject **layouts; /* per worker, keep slots by header hash (direct-mapped: a newer layout takes its slot) */
    Queue *ready;
    ServeRequestObject *arriving; /* requests whose separate pushes are still coming */
    int64_t next_handle;
    Send *sends;
    Py_ssize_t n_sends, cap_sends;
    uint8_t **pool;
    Py_ssize_t n_pool, cap_pool, resp_max;
    int closed;
} ServerCoreObject;

static PyTypeObject LayoutType;
static PyTypeObject ServeRequestType;

#define SERVER_READY(self)                                                                                     \
    if ((self)->ops == NULL) {                                                                                     \
        PyErr_SetString(PyExc_RuntimeError, "ServerCore was not initialised");                                   \
        return NULL;                                                                                               \
    }


/* The size of the request header at buf as its fixed part and tensor entries say, or -1 (then Python decodes it). */
static Py_ssize_t header_size(const uint8_t *buf, Py_ssize_t limit) {
    if (limit < SEQ_OFFSET + 4)
        return -1;
    Py_ssize_t n_push = smc_rd16(buf + 2), pulls = (Py_ssize_t)smc_rd16(buf + 4) * smc_rd16(buf + 6), pos = SEQ_OFFSET + 4;
    for (Py_ssize_t i = 0; i < n_push; i++) { /* key q, dtype B, ndim B, nbytes Q, then ndim q */
        if (pos + 18 > limit || buf[pos + 9] > 8)
            return -1;
        pos += 18 + 8 * (Py_ssize_t)buf[pos + 9];
    }
    pos += 16 * pulls; /* key q, capacity Q */
    return pos <= limit ? pos : -1;
}

static uint64_t header_hash(const uint8_t *buf, Py_ssize_t size) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, skipping the sequence number */
    for (Py_ssize_t i = 0; i < size; i++) {
        if (i == SEQ_OFFSET)
            i += 4;
        if (i >= size)
            break;
        h = (h ^ buf[i]) * 0x100000001b3ULL;
    }
    return h ^ (uint64_t)size;
}


/* ------------------------------------------------------------------ Layout */

static void Layout_dealloc(LayoutObject *self) {
    Py_XDECREF(self->obj);
    Py_XDECREF(self->keys);
    Py_XDECREF(self->dest);
    PyMem_Free(self->head);
    PyMem_Free(self->sep);
    PyMem_Free(self->moves);
    PyMem_Free(self->caps);
    PyMem_Free(self->small);
    PyObject_Free(self);
}

/* Layout(obj, head, keys, dest, fill, sep, moves, caps, small, resp_pos) */
static PyObject *Layout_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *obj, *head, *keys, *dest, *sep, *moves, *caps, *small;
    int fill;
    unsigned long long resp_pos;
    if (!PyArg_ParseTuple(args, "OSO!O!pO!O!O!O!K", &obj, &head, &PyList_Type, &keys, &PyList_Type, &dest, &fill,
                          &PyList_Type, &sep, &PyList_Type, &moves, &PyList_Type, &caps, &PyList_Type, &small, &resp_pos))
        return NULL;
    LayoutObject *l = PyObject_New(LayoutObject, type);
    if (l == NULL)
        return NULL;
    l->obj = Py_NewRef(obj);
    l->keys = Py_NewRef(keys);
    l->dest = Py_NewRef(dest);
    l->fill = fill;
    l->size = PyBytes_GET_SIZE(head);
    l->n_tensors = PyList_GET_SIZE(dest);
    l->resp_pos = resp_pos;
    l->head = NULL;
    l->sep = NULL;
    l->moves = NULL;
    l->caps = NULL;
    l->small = NULL;
    Py_ssize_t n_small;
    uint64_t *small64 = NULL;
    if ((l->head = PyMem_Malloc(l->size ? l->size : 1)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(l->head, PyBytes_AS_STRING(head), l->size);
    if (l->size < SEQ_OFFSET + 4 || header_size(l->head, l->size) != l->size) {
        PyErr_SetString(PyExc_ValueError, "Layout: head is not one whole request header");
        goto fail;
    }
    l->hash = header_hash(l->head, l->size);
    if (smc_u64_rows(sep, 3, (uint64_t **)&l->sep, &l->n_sep, "sep") < 0 ||
        smc_u64_rows(moves, 3, (uint64_t **)&l->moves, &l->n_moves, "moves") < 0 ||
        smc_u64_rows(caps, 1, &l->caps, &l->n_pulls, "caps") < 0 || smc_u64_rows(small, 1, &small64, &n_small, "small") < 0)
        goto fail;
    if (n_small != l->n_pulls) {
        PyErr_SetString(PyExc_ValueError, "Layout: one small flag per answer");
        goto fail;
    }
    if (l->resp_pos < RESP_FIXED + 8 * (uint64_t)l->n_pulls) {
        PyErr_SetString(PyExc_ValueError, "Layout: resp_pos leaves no room for the response's fixed part and sizes");
        goto fail;
    }
    if ((l->small = PyMem_Malloc(n_small ? n_small : 1)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t j = 0; j < n_small; j++)
        l->small[j] = small64[j] != 0;
    for (Py_ssize_t s = 0; s < l->n_sep; s++)
        if (l->sep[s].i >= (uint64_t)l->n_tensors) {
            PyErr_SetString(PyExc_ValueError, "Layout: a separate push beyond the tensors");
            goto fail;
        }
    if (!fill)
        for (Py_ssize_t i = 0; i < l->n_tensors; i++)
            if (PyList_GET_ITEM(dest, i) == Py_None) {
                PyErr_SetString(PyExc_ValueError, "Layout: a push without a registered chunk needs fill");
                goto fail;
            }
    PyMem_Free(small64);
    return (PyObject *)l;
fail:
    PyMem_Free(small64);
    Py_DECREF(l);
    return NULL;
}

static PyObject *Layout_get_obj(LayoutObject *self, void *closure) { return Py_NewRef(self->obj); }

static PyGetSetDef Layout_getset[] = {
    {"obj", (getter)Layout_get_obj, NULL, "The stepmesh.server._Layout it was made from.", NULL},
    {NULL},
};

static PyTypeObject LayoutType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.Layout",
    .tp_basicsize = sizeof(LayoutObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request layout as the server core takes it in (built by stepmesh.server).",
    .tp_new = Layout_new,
    .tp_dealloc = (destructor)Layout_dealloc,
    .tp_getset = Layout_getset,
};

/* ------------------------------------------------------------ ServeRequest */

static void ServeRequest_dealloc(ServeRequestObject *self) {
    Py_XDECREF(self->lay);
    Py_XDECREF(self->tensors);
    PyMem_Free(self->req);
    PyMem_Free(self->status);
    PyObject_Free(self);
}

#define GETTER(name, expr)                                                                                             \
    static PyObject *ServeRequest_get_##name(ServeRequestObject *self, void *closure) { return expr; }
GETTER(worker, PyLong_FromSsize_t(self->worker))
GETTER(seq, PyLong_FromUnsignedLong(self->seq))
GETTER(handle, PyLong_FromLongLong(self->handle))
GETTER(t_recv, PyLong_FromUnsignedLongLong(self->t_recv))
GETTER(t_proc, PyLong_FromUnsignedLongLong(self->t_proc))
GETTER(tensors, Py_NewRef(self->tensors))
GETTER(layout, Py_NewRef(self->lay->obj))
#undef GETTER

static PyGetSetDef ServeRequest_getset[] = {
    {"worker", (getter)ServeRequest_get_worker, NULL, "The worker's index in the group.", NULL},
    {"seq", (getter)ServeRequest_get_seq, NULL, "Its sequence number.", NULL},
    {"handle", (getter)ServeRequest_get_handle, NULL, "Its get_batch handle (0 before).", NULL},
    {"t_recv", (getter)ServeRequest_get_t_recv, NULL, "When the whole request was in (monotonic ns).", NULL},
    {"t_proc", (getter)ServeRequest_get_t_proc, NULL, "When get_batch handed it out.", NULL},
    {"tensors", (getter)ServeRequest_get_tensors, NULL, "Its push tensors.", NULL},
    {"layout", (getter)ServeRequest_get_layout, NULL, "Its stepmesh.server._Layout.", NULL},
    {NULL},
};

static PyTypeObject ServeRequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.ServeRequest",
    .tp_basicsize = sizeof(ServeRequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request from one worker, from its header until the server answers it.",
    .tp_dealloc = (destructor)ServeRequest_dealloc,
    .tp_getset = ServeRequest_getset,
};

static void queue_push(Queue *q, ServeRequestObject *r) { /* takes the reference */
    r->next = NULL;
    if (q->tail != NULL)
        q->tail->next = r;
    else
        q->head = r;
    q->tail = r;
    q->n++;
}

static ServeRequestObject *queue_pop(Queue *q) { /* gives the reference */
    ServeRequestObject *r = q->head;
    q->head = r->next;
    if (q->head == NULL)
        q->tail = NULL;
    r->next = NULL;
    q->n--;
    return r;
}

/* -------------------------------------------------------------- ServerCore */

static void post_slot(ServerCoreObject *self, Py_ssize_t w, Py_ssize_t k) {
    Py_ssize_t i = w * self->depth + k;
    void *h = smc_recv(self->ops, self->slot_buf[i], self->slot_size, self->ring_tags[w], self->mask, 0);
    if ((uintptr_t)h >= SMC_ERR_MIN) { /* taken in (and reported) by the next pump */
        self->slot_req[i] = NULL;
        self->slot_status[i] = (int)(intptr_t)h;
    } else {
        self->slot_req[i] = h;
        self->slot_status[i] = h != NULL ? UCS_INPROGRESS : 0;
    }
    Py_ssize_t *ring = self->ring + w * self->depth;
    ring[(self->head[w] + self->count[w]) % self->depth] = k;
    self->count[w]++;
}

static void repost(ServerCoreObject *self) {
    for (Py_ssize_t w = 0; w < self->n_workers; w++) {
        for (Py_ssize_t i = 0; i < self->n_spare[w]; i++)
            post_slot(self, w, self->spare[w * self->depth + i]);
        self->n_spare[w] = 0;
    }
}

static LayoutObject *find_layout(ServerCoreObject *self, Py_ssize_t w, const uint8_t *buf) {
    Py_ssize_t size = header_size(buf, self->slot_size);
    if (size < 0)
        return NULL;
    uint64_t h = header_hash(buf, size);
    LayoutObject *l = self->layouts[w * self->keep + (Py_ssize_t)(h & (uint64_t)(self->keep - 1))];
    if (l == NULL || l->hash != h || l->size != size || memcmp(buf, l->head, SEQ_OFFSET) != 0 ||
        memcmp(buf + SEQ_OFFSET + 4, l->head + SEQ_OFFSET + 4, size - SEQ_OFFSET - 4) != 0)
        return NULL;
    return l;
}

static void remember_layout(ServerCoreObject *self, Py_ssize_t w, LayoutObject *l) {
    Py_XSETREF(self->layouts[w * self->keep + (Py_ssize_t)(l->hash & (uint64_t)(self->keep - 1))],
               (LayoutObject *)Py_NewRef(l));
}

static uint64_t data_ptr(PyObject *t) {
    PyObject *v = PyObject_CallMethodNoArgs(t, smc_str_data_ptr);
    if (v == NULL)
        return 0;
    uint64_t p = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return PyErr_Occurred() ? 0 : p;
}

/* Take in the header in slot k of worker w (complete with ``status``). */
static int take(ServerCoreObject *self, Py_ssize_t w, Py_ssize_t k, int status) {
    const uint8_t *buf = (const uint8_t *)(uintptr_t)self->slot_buf[w * self->depth + k];
    LayoutObject *lay = status == 0 ? find_layout(self, w, buf) : NULL;
    if (lay != NULL) {
        Py_INCREF(lay);
    } else {
        PyObject *got = PyObject_CallFunction(self->new_layout, "nni", w, k, status);
        if (got == NULL)
            return -1;
        if (Py_TYPE(got) != &LayoutType) {
            PyErr_Format(PyExc_TypeError, "new_layout returned %s, not a Layout", Py_TYPE(got)->tp_name);
            Py_DECREF(got);
            return -1;
        }
        lay = (LayoutObject *)got;
        for (Py_ssize_t m = 0; m < lay->n_moves; m++) {
            if (lay->moves[m].pos > (uint64_t)self->slot_size || lay->moves[m].n > (uint64_t)self->slot_size - lay->moves[m].pos) {
                PyErr_SetString(PyExc_ValueError, "new_layout: an inline push beyond the receive slot");
                Py_DECREF(lay);
                return -1;
            }
        }
        remember_layout(self, w, lay);
    }
    PyObject *tensors = lay->fill ? PyObject_CallFunction(self->fill, "nnO", w, k, lay->obj)
                                  : PyList_GetSlice(lay->dest, 0, lay->n_tensors);
    if (tensors == NULL || !PyList_CheckExact(tensors) || PyList_GET_SIZE(tensors) != lay->n_tensors) {
        if (tensors != NULL)
            PyErr_SetString(PyExc_TypeError, "fill must return a list of the request's tensors");
        Py_XDECREF(tensors);
        Py_DECREF(lay);
        return -1;
    }
    ServeRequestObject *r = PyObject_New(ServeRequestObject, &ServeRequestType);
    if (r == NULL) {
        Py_DECREF(tensors);
        Py_DECREF(lay);
        return -1;
    }
    r->next = NULL;
    r->lay = lay;
    r->tensors = tensors;
    r->worker = w;
    r->seq = smc_rd32(buf + SEQ_OFFSET);
    r->handle = 0;
    r->t_recv = r->t_proc = 0;
    r->n_open = 0;
    r->req = NULL;
    r->status = NULL;
    if (lay->n_sep) { /* first, so that UCX moves them while the inline ones are copied */
        r->req = PyMem_Calloc(lay->n_sep, sizeof(void *));
        r->status = PyMem_Calloc(lay->n_sep, sizeof(int));
        if (r->req == NULL || r->status == NULL) {
            Py_DECREF(r);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t s = 0; s < lay->n_sep; s++) { /* every address first: nothing posted if one fails */
            Sep *sp = &lay->sep[s];
            uint64_t ptr = sp->ptr ? sp->ptr : data_ptr(PyList_GET_ITEM(tensors, sp->i));
            if (PyErr_Occurred()) {
                Py_DECREF(r);
                return -1;
            }
            r->req[s] = (void *)(uintptr_t)ptr;
        }
        uint64_t bits = self->push_tags[w] | ((uint64_t)r->seq << SEQ_SHIFT);
        for (Py_ssize_t s = 0; s < lay->n_sep; s++) {
            Sep *sp = &lay->sep[s];
            void *h = smc_recv(self->ops, (uintptr_t)r->req[s], sp->n, bits | sp->i, UINT64_MAX, 0);
            r->req[s] = NULL;
            if ((uintptr_t)h >= SMC_ERR_MIN) {
                r->status[s] = (int)(intptr_t)h;
            } else if (h != NULL) {
                r->req[s] = h;
                r->n_open++;
            }
        }
    }
    for (Py_ssize_t m = 0; m < lay->n_moves; m++) {
        Move *mv = &lay->moves[m];
        memmove((void *)(uintptr_t)mv->dst, buf + mv->pos, mv->n);
    }
    for (Py_ssize_t s = 0; r->n_open == 0 && s < lay->n_sep; s++) {
        if (r->status[s] != 0) { /* refused, and nothing of the request in flight: report it now */
            int status = r->status[s];
            Py_DECREF(r);
            smc_raise_status(smc_on_refused, status);
            return -1;
        }
    }
    if (r->n_open) { /* a refused receive among them is reported once the others are complete */
        r->next = self->arriving;
        self->arriving = r;
    } else {
        r->t_recv = smc_now_ns();
        queue_push(&self->ready[w], r);
    }
    return 0;
}

/* Take in every header that arrived and every request whose pushes have all come. */
static int pump(ServerCoreObject *self) {
    for (Py_ssize_t w = 0; w < self->n_workers; w++) {
        Py_ssize_t *ring = self->ring + w * self->depth;
        while (self->count[w]) {
            Py_ssize_t k = ring[self->head[w]];
            Py_ssize_t i = w * self->depth + k;
            if (self->slot_req[i] != NULL) {
                int st = smc_poll(self->ops, self->slot_req[i]);
                if (st == UCS_INPROGRESS)
                    break;
                self->slot_req[i] = NULL;
                self->slot_status[i] = st;
            }
            self->head[w] = (self->head[w] + 1) % self->depth;
            self->count[w]--;
            self->spare[w * self->depth + self->n_spare[w]++] = k; /* posted again by the next get_batch */
            if (take(self, w, k, self->slot_status[i]) < 0)
                return -1;
        }
        if (!self->count[w])
            repost(self);
    }
    ServeRequestObject **link = &self->arriving;
    uint64_t now = 0;
    while (*link != NULL) {
        ServeRequestObject *r = *link;
        for (Py_ssize_t s = 0; s < r->lay->n_sep; s++) {
            if (r->req[s] == NULL)
                continue;
            int st = smc_poll(self->ops, r->req[s]);
            if (st == UCS_INPROGRESS)
                continue;
            r->req[s] = NULL;
            r->status[s] = st;
            r->n_open--;
        }
        if (r->n_open) {
            link = &r->next;
            continue;
        }
        *link = r->next;
        for (Py_ssize_t s = 0; s < r->lay->n_sep; s++) {
            if (r->status[s] != 0) {
                int status = r->status[s];
                Py_DECREF(r);
                smc_raise_status(smc_on_failed, status);
                return -1;
            }
        }
        if (now == 0)
            now = smc_now_ns();
        r->t_recv = now;
        queue_push(&self->ready[r->worker], r);
    }
    return 0;
}

static int all_ready(ServerCoreObject *self) {
    for (Py_ssize_t w = 0; w < self->n_workers; w++)
        if (!self->ready[w].n)
            return 0;
    return 1;
}

static PyObject *batch(ServerCoreObject *self) {
    PyObject *out = PyList_New(self->n_workers);
    if (out == NULL)
        return NULL;
    uint64_t t_proc = smc_now_ns();
    for (Py_ssize_t w = 0; w < self->n_workers; w++) {
        ServeRequestObject *r = queue_pop(&self->ready[w]);
        r->t_proc = t_proc;
        r->handle = self->next_handle++;
        PyObject *key = PyLong_FromLongLong(r->handle);
        PyObject *item = key ? PyTuple_Pack(3, key, r->tensors, r->lay->keys) : NULL;
        if (item == NULL || PyDict_SetItem(self->handles, key, (PyObject *)r) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(item);
            Py_DECREF(r);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(r);
        PyList_SET_ITEM(out, w, item);
    }
    return out;
}

/* Take in what arrived; whether every worker now has a request (-1: an error is set). */
static int pump_ready(void *arg) {
    ServerCoreObject *self = arg;
    return pump(self) < 0 ? -1 : all_ready(self);
}

/* get_batch(spins) -> one (handle, tensors, keys) per worker, or None when not every worker has one yet. */
static PyObject *ServerCore_get_batch(ServerCoreObject *self, PyObject *arg) {
    uint64_t spins;
    SERVER_READY(self)
    if (smc_as_u64(arg, &spins, "spins") < 0 || smc_ready(self->ops) < 0)
        return NULL;
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "get_batch() on a closed ServerCore");
        return NULL;
    }
    repost(self);
    int ready = smc_spin(self->ops, spins, pump_ready, self);
    if (ready < 0)
        return NULL;
    if (!ready)
        Py_RETURN_NONE;
    return batch(self);
}

static uint8_t *pool_get(ServerCoreObject *self) {
    if (self->n_pool)
        return self->pool[--self->n_pool];
    uint8_t *b = malloc(self->resp_max);
    if (b == NULL)
        PyErr_NoMemory();
    return b;
}

static void pool_put(ServerCoreObject *self, uint8_t *b) {
    if (self->n_pool == self->cap_pool) {
        Py_ssize_t cap = self->cap_pool ? 2 * self->cap_pool : 8;
        uint8_t **grown = PyMem_Realloc(self->pool, cap * sizeof(uint8_t *));
        if (grown == NULL) {
            free(b);
            return;
        }
        self->pool = grown;
        self->cap_pool = cap;
    }
    self->pool[self->n_pool++] = b;
}

static void reap(ServerCoreObject *self) {
    Py_ssize_t keep = 0;
    PyObject *done[64];
    Py_ssize_t n_done = 0;
    for (Py_ssize_t i = 0; i < self->n_sends; i++) {
        int st = smc_poll(self->ops, self->sends[i].h);
        Send s = self->sends[i]; /* after the poll (which may let go of the GIL) */
        if (st == UCS_INPROGRESS) {
            self->sends[keep++] = s;
            continue;
        }
        if (s.buf != NULL)
            pool_put(self, s.buf);
        if (s.keep != NULL) { /* dropped once the list is consistent again (a tensor's finalizer may run) */
            if (n_done == 64)
                Py_DECREF(s.keep);
            else
                done[n_done++] = s.keep;
        }
    }
    self->n_sends = keep;
    for (Py_ssize_t i = 0; i < n_done; i++)
        Py_DECREF(done[i]);
}

static int track(ServerCoreObject *self, void *h, uint8_t *buf, PyObject *keep) {
    if (self->n_sends == self->cap_sends) {
        Py_ssize_t cap = self->cap_sends ? 2 * self->cap_sends : 16;
        Send *grown = PyMem_Realloc(self->sends, cap * sizeof(Send));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->sends = grown;
        self->cap_sends = cap;
    }
    Send *s = &self->sends[self->n_sends++];
    s->h = h;
    s->buf = buf;
    s->keep = keep != NULL ? Py_NewRef(keep) : NULL;
    return 0;
}

typedef struct {
    uint64_t ptr, n;
    PyObject *t;
} Answer;

/* One answer checked as stepmesh.server.respond's common case does: 0, or -1 (Python says what is wrong). */
static int check_answer(PyObject *t, uint64_t cap, int small, Answer *a) {
    SmcTensor info;
    if (smc_read_tensor(t, &info, 0) < 0 || !info.contig || PyDict_Contains(smc_dtypes, info.dtype) != 1 ||
        info.nbytes > cap)
        return -1;
    if (small && info.nbytes && info.cuda) /* copied into the response here: host memory only */
        return -2;
    a->n = info.nbytes;
    a->ptr = info.ptr;
    return 0;
}

/* respond(tensors, handle) -> RESPOND_*: sent, unknown handle, let Python check, let Python send */
static void drop_answers(Answer *answers, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++)
        Py_CLEAR(answers[j].t);
}

static PyObject *respond_code(ServeRequestObject *r, Answer *answers, Py_ssize_t n, int code) {
    drop_answers(answers, n);
    Py_XDECREF(r);
    return PyLong_FromLong(code);
}

static PyObject *ServerCore_respond(ServerCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SERVER_READY(self)
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "respond(tensors, handle)");
        return NULL;
    }
    PyObject *tensors = args[0], *key = args[1];
    if (self->closed)
        return PyLong_FromLong(RESPOND_CHECK);
    if (!PyLong_CheckExact(key))
        return PyLong_FromLong(RESPOND_UNKNOWN);
    ServeRequestObject *r = (ServeRequestObject *)PyDict_GetItemWithError(self->handles, key);
    if (r == NULL || Py_TYPE(r) != &ServeRequestType) {
        PyErr_Clear();
        return PyLong_FromLong(RESPOND_UNKNOWN);
    }
    Py_INCREF(r); /* torch's getters below may run Python code */
    LayoutObject *lay = r->lay;
    Py_ssize_t n = lay->n_pulls;
    Answer answers[256];
    if (!PyList_CheckExact(tensors) || PyList_GET_SIZE(tensors) != n || n > 256)
        return respond_code(r, answers, 0, RESPOND_CHECK);
    for (Py_ssize_t j = 0; j < n; j++) {
        if (PyList_GET_SIZE(tensors) != n) /* changed by such code */
            return respond_code(r, answers, j, RESPOND_CHECK);
        answers[j].t = Py_NewRef(PyList_GET_ITEM(tensors, j));
        int rc = check_answer(answers[j].t, lay->caps[j], lay->small[j], &answers[j]);
        if (rc < 0) {
            PyErr_Clear();
            return respond_code(r, answers, j + 1, rc == -2 ? RESPOND_PYTHON : RESPOND_CHECK);
        }
    }
    uint64_t pos = lay->resp_pos;
    for (Py_ssize_t j = 0; j < n; j++)
        if (lay->small[j])
            pos += answers[j].n;
    if (pos > (uint64_t)self->resp_max || PyDict_GetItemWithError(self->handles, key) != (PyObject *)r) {
        PyErr_Clear();
        return respond_code(r, answers, n, RESPOND_CHECK);
    }
    uint8_t *buf = pool_get(self);
    if (buf == NULL) {
        drop_answers(answers, n);
        Py_DECREF(r);
        return NULL;
    }
    /* The handle goes now: before anything is sent, and answered once whatever follows. */
    if (PyDict_DelItem(self->handles, key) < 0) {
        pool_put(self, buf);
        drop_answers(answers, n);
        Py_DECREF(r);
        return NULL;
    }
    int had = self->n_sends > 0;
    uint64_t now = smc_now_ns();
    buf[0] = (uint8_t)self->data_version;
    buf[1] = 0;
    smc_wr16(buf + 2, 0);
    smc_wr16(buf + 4, (uint16_t)n);
    smc_wr32(buf + 6, r->seq);
    smc_wr64(buf + 10, r->t_recv);
    smc_wr64(buf + 18, r->t_proc);
    smc_wr64(buf + 26, now);
    smc_wr64(buf + 34, now);
    pos = lay->resp_pos;
    for (Py_ssize_t j = 0; j < n; j++) {
        smc_wr64(buf + RESP_FIXED + 8 * j, answers[j].n);
        /* Small answers are copied, not gathered from the tensors: a send UCX cannot start at once would
           read them later, and the caller may write its next answer there as soon as respond returns. */
        if (lay->small[j] && answers[j].n) {
            memcpy(buf + pos, (const void *)(uintptr_t)answers[j].ptr, answers[j].n);
            pos += answers[j].n;
        }
    }
    uint64_t ep = self->eps[r->worker];
    uint64_t bits = (uint64_t)r->seq << SEQ_SHIFT;
    int failed = 0;
    void *h = smc_send(self->ops, ep, (uintptr_t)buf, pos, self->resp_tag | bits, 0);
    if ((uintptr_t)h >= SMC_ERR_MIN) {
        failed = (int)(intptr_t)h;
        pool_put(self, buf);
    } else if (h == NULL) {
        pool_put(self, buf); /* sent within the call: UCX copied it out */
    } else if (track(self, h, buf, NULL) < 0) {
        failed = -1; /* out of memory: the buffer leaks rather than be freed under UCX */
    }
    for (Py_ssize_t j = 0; j < n && !failed; j++) {
        if (lay->small[j])
            continue;
        h = smc_send(self->ops, ep, answers[j].ptr, answers[j].n, self->pull_tag | bits | (uint64_t)j, 0);
        if ((uintptr_t)h >= SMC_ERR_MIN) {
            failed = (int)(intptr_t)h;
        } else if (h != NULL && track(self, h, NULL, answers[j].t) < 0) {
            answers[j].t = NULL; /* out of memory: UCX reads this tensor: it leaks rather than be freed */
            failed = -1;
        }
    }
    drop_answers(answers, n);
    Py_DECREF(r);
    if (failed == -1)
        return NULL;
    if (failed)
        return smc_raise_status(smc_on_refused, failed);
    if (had) /* after the answer is on its way */
        reap(self);
    return PyLong_FromLong(RESPOND_SENT);
}

/* reap() -> answer messages still in flight */
static PyObject *ServerCore_reap(ServerCoreObject *self, PyObject *unused) {
    SERVER_READY(self)
    if (self->n_sends)
        reap(self);
    return PyLong_FromSsize_t(self->n_sends);
}

static void forget_layouts(ServerCoreObject *self) {
    for (Py_ssize_t i = 0; i < self->n_workers * self->keep; i++)
        Py_CLEAR(self->layouts[i]);
}

static PyObject *ServerCore_forget_layouts(ServerCoreObject *self, PyObject *unused) {
    SERVER_READY(self)
    forget_layouts(self);
    Py_RETURN_NONE;
}

/* close(): cancel and free every operation in flight. What they point at is left alone (UCX may finish
   with it while the worker is torn down), so their buffers are not freed. */
static PyObject *ServerCore_close(ServerCoreObject *self, PyObject *unused) {
    if (self->closed || self->ops == NULL)
        Py_RETURN_NONE;
    self->closed = 1;
    for (Py_ssize_t i = 0; i < self->n_workers * self->depth; i++) {
        if (self->slot_req[i] != NULL) {
            smc_cancel(self->ops, self->slot_req[i]);
            smc_ucp_free(self->slot_req[i]);
            self->slot_req[i] = NULL;
        }
    }
    while (self->arriving != NULL) {
        ServeRequestObject *r = self->arriving;
        self->arriving = r->next;
        for (Py_ssize_t s = 0; s < r->lay->n_sep; s++)
            if (r->req[s] != NULL) {
                smc_cancel(self->ops, r->req[s]);
                smc_ucp_free(r->req[s]);
                r->req[s] = NULL;
            }
        r->tensors = NULL; /* their memory may still be written: left to leak */
        Py_DECREF(r);
    }
    for (Py_ssize_t i = 0; i < self->n_sends; i++) {
        smc_cancel(self->ops, self->sends[i].h);
        smc_ucp_free(self->sends[i].h);
    }
    self->n_sends = 0; /* buffers and tensors of sends still in flight are left to leak likewise */
    for (Py_ssize_t w = 0; w < self->n_workers; w++)
        while (self->ready[w].n)
            Py_DECREF(queue_pop(&self->ready[w]));
    forget_layouts(self);
    Py_CLEAR(self->new_layout); /* the server's bound methods: no cycle through a closed core */
    Py_CLEAR(self->fill);
    Py_RETURN_NONE;
}

static int ServerCore_traverse(ServerCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->new_layout);
    Py_VISIT(self->fill);
    Py_VISIT(self->handles);
    Py_VISIT(self->ops);
    return 0;
}

static int ServerCore_clear(ServerCoreObject *self) {
    Py_CLEAR(self->new_layout);
    Py_CLEAR(self->fill);
    return 0;
}

static PyObject *ServerCore_get_handles(ServerCoreObject *self, void *closure) {
    SERVER_READY(self)
    return Py_NewRef(self->handles);
}
static PyObject *ServerCore_get_next_handle(ServerCoreObject *self, void *closure) {
    return PyLong_FromLongLong(self->next_handle);
}

#define ALLOC(field, n, type)                                                                                          \
    if ((self->field = PyMem_Calloc((n), sizeof(type))) == NULL) { /* n >= 1 */                                       \
        PyErr_NoMemory();                                                                                              \
        return -1;                                                                                                     \
    }

/* ServerCore(ops, handles, eps, ring_tags, push_tags, slots, slot_size, mask, resp_tag, pull_tag,
              data_version, layouts_keep, resp_max, new_layout, fill) */
static int ServerCore_init(ServerCoreObject *self, PyObject *args, PyObject *kwds) {
    PyObject *ops, *handles, *eps, *ring_tags, *push_tags, *slots, *new_layout, *fill;
    Py_ssize_t slot_size, keep, resp_max;
    unsigned long long mask, resp_tag, pull_tag;
    int version;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!nKKKinnOO", &SmcTagOpsType, &ops, &PyDict_Type, &handles, &PyList_Type, &eps,
                          &PyList_Type, &ring_tags, &PyList_Type, &push_tags, &PyList_Type, &slots, &slot_size, &mask,
                          &resp_tag, &pull_tag, &version, &keep, &resp_max, &new_layout, &fill))
        return -1;
    if (self->ops != NULL || self->eps != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ServerCore is already initialised (or its initialisation failed)");
        return -1;
    }
    if (smc_ready((TagOpsObject *)ops) < 0)
        return -1;
    if (smc_tensor_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "stepmesh._ucpc.bind_torch() was not called");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(eps);
    if (n < 1 || PyList_GET_SIZE(ring_tags) != n || PyList_GET_SIZE(push_tags) != n || PyList_GET_SIZE(slots) != n ||
        keep < 1 || (keep & (keep - 1)) || slot_size < SEQ_OFFSET + 4 || resp_max < RESP_FIXED || !PyCallable_Check(new_layout) ||
        !PyCallable_Check(fill)) {
        PyErr_SetString(PyExc_ValueError, "ServerCore: one endpoint, ring tag, push tag and slot list per worker");
        return -1;
    }
    PyObject *first = PyList_GET_ITEM(slots, 0);
    Py_ssize_t depth = PyList_Check(first) ? PyList_GET_SIZE(first) : 0;
    if (depth < 1) {
        PyErr_SetString(PyExc_ValueError, "ServerCore: slots is a list of lists of addresses");
        return -1;
    }
    self->n_workers = n;
    self->depth = depth;
    self->slot_size = slot_size;
    self->keep = keep;
    self->resp_max = resp_max;
    self->mask = mask;
    self->resp_tag = resp_tag;
    self->pull_tag = pull_tag;
    self->data_version = version;
    self->next_handle = 1;
    ALLOC(eps, n, uint64_t)
    ALLOC(ring_tags, n, uint64_t)
    ALLOC(push_tags, n, uint64_t)
    ALLOC(slot_buf, n * depth, uint64_t)
    ALLOC(slot_req, n * depth, void *)
    ALLOC(slot_status, n * depth, int)
    ALLOC(ring, n * depth, Py_ssize_t)
    ALLOC(head, n, Py_ssize_t)
    ALLOC(count, n, Py_ssize_t)
    ALLOC(spare, n * depth, Py_ssize_t)
    ALLOC(n_spare, n, Py_ssize_t)
    ALLOC(layouts, n * keep, LayoutObject *)
    ALLOC(ready, n, Queue)
    for (Py_ssize_t w = 0; w < n; w++) {
        PyObject *mine = PyList_GET_ITEM(slots, w);
        if (smc_as_u64(PyList_GET_ITEM(eps, w), &self->eps[w], "eps") < 0 ||
            smc_as_u64(PyList_GET_ITEM(ring_tags, w), &self->ring_tags[w], "ring_tags") < 0 ||
            smc_as_u64(PyList_GET_ITEM(push_tags, w), &self->push_tags[w], "push_tags") < 0)
            return -1;
        if (!PyList_Check(mine) || PyList_GET_SIZE(mine) != depth) {
            PyErr_SetString(PyExc_ValueError, "ServerCore: every worker has as many slots");
            return -1;
        }
        for (Py_ssize_t k = 0; k < depth; k++)
            if (smc_as_u64(PyList_GET_ITEM(mine, k), &self->slot_buf[w * depth + k], "slots") < 0)
                return -1;
    }
    self->ops = (TagOpsObject *)Py_NewRef(ops);
    self->handles = Py_NewRef(handles);
    self->new_layout = Py_NewRef(new_layout);
    self->fill = Py_NewRef(fill);
    for (Py_ssize_t w = 0; w < n; w++)
        for (Py_ssize_t k = 0; k < depth; k++)
            post_slot(self, w, k);
    return 0;
}
#undef ALLOC

static void ServerCore_dealloc(ServerCoreObject *self) {
    PyObject_GC_UnTrack(self);
    if (!self->closed && self->ops != NULL && self->slot_req != NULL) { /* cancel first: UCX must not use freed memory */
        PyObject *r = ServerCore_close(self, NULL);
        if (r == NULL)
            PyErr_WriteUnraisable((PyObject *)self);
        Py_XDECREF(r);
    }
    if (self->layouts != NULL)
        forget_layouts(self);
    while (self->arriving != NULL) {
        ServeRequestObject *r = self->arriving;
        self->arriving = r->next;
        Py_DECREF(r);
    }
    if (self->ready != NULL)
        for (Py_ssize_t w = 0; w < self->n_workers; w++)
            while (self->ready[w].n)
                Py_DECREF(queue_pop(&self->ready[w]));
    for (Py_ssize_t i = 0; i < self->n_pool; i++)
        free(self->pool[i]);
    PyMem_Free(self->pool);
    PyMem_Free(self->sends);
    PyMem_Free(self->eps);
    PyMem_Free(self->ring_tags);
    PyMem_Free(self->push_tags);
    PyMem_Free(self->slot_buf);
    PyMem_Free(self->slot_req);
    PyMem_Free(self->slot_status);
    PyMem_Free(self->ring);
    PyMem_Free(self->head);
    PyMem_Free(self->count);
    PyMem_Free(self->spare);
    PyMem_Free(self->n_spare);
    PyMem_Free(self->layouts);
    PyMem_Free(self->ready);
    Py_XDECREF(self->new_layout);
    Py_XDECREF(self->fill);
    Py_XDECREF(self->handles);
    Py_XDECREF(self->ops);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef ServerCore_methods[] = {
    {"get_batch", (PyCFunction)ServerCore_get_batch, METH_O,
     "get_batch(spins) -> [(handle, tensors, keys)] one per worker, or None: busy-polls at most ``spins`` steps."},
    {"respond", (PyCFunction)(void (*)(void))ServerCore_respond, METH_FASTCALL,
     "respond(tensors, handle) -> 0 sent, 1 unknown handle, 2 for Python to check, 3 for Python to send "
     "(small answers in device memory). It returns 1-3 before sending anything; once it sends, the handle is "
     "used up, and a send UCX refuses raises."},
    {"reap", (PyCFunction)ServerCore_reap, METH_NOARGS, "reap() -> answer messages still in flight."},
    {"forget_layouts", (PyCFunction)ServerCore_forget_layouts, METH_NOARGS,
     "Forget every remembered layout (registered buffers changed)."},
    {"close", (PyCFunction)ServerCore_close, METH_NOARGS, "Cancel every operation in flight."},
    {NULL},
};

static PyGetSetDef ServerCore_getset[] = {
    {"handles", (getter)ServerCore_get_handles, NULL, "handle -> ServeRequest handed out and not answered.", NULL},
    {"next_handle", (getter)ServerCore_get_next_handle, NULL, "The handle the next request gets.", NULL},
    {NULL},
};

static PyTypeObject ServerCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.ServerCore",
    .tp_basicsize = sizeof(ServerCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A server's receive rings, request layouts and answers (built by stepmesh.server).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ServerCore_init,
    .tp_dealloc = (destructor)ServerCore_dealloc,
    .tp_traverse = (traverseproc)ServerCore_traverse,
    .tp_clear = (inquiry)ServerCore_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = ServerCore_methods,
    .tp_getset = ServerCore_getset,
};

int smc_add_server_types(PyObject *m) {
    if (PyType_Ready(&LayoutType) < 0 || PyType_Ready(&ServeRequestType) < 0 || PyType_Ready(&ServerCoreType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Layout", (PyObject *)&LayoutType) < 0 ||
        PyModule_AddObjectRef(m, "ServeRequest", (PyObject *)&ServeRequestType) < 0 ||
        PyModule_AddObjectRef(m, "ServerCore", (PyObject *)&ServerCoreType) < 0)
        return -1;
    return 0;
}
