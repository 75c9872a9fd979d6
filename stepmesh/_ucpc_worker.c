/* The steady state of a worker's push_pull and wait, in C.
 *
 * stepmesh.worker builds a Plan once per call signature (buffers, shapes,
 * dtypes, keys): the endpoints, the request header with everything but the
 * sequence number written, which tensors are gathered behind it and which
 * travel as messages of their own, and for each server where its response and
 * answers land. WorkerCore then runs each call of that signature with no Python
 * in between: it stamps the sequence, posts the sends and the receives, spins
 * until they are complete, checks every response header, copies inline answers
 * out and keeps the trace stamps.
 *
 * What goes wrong is handed back to Python, which words the error: wait()
 * returns WAIT_FAILED and the call (with its buffers) waits in ``failed``.
 *
 * Wire layout: stepmesh.protocol (REQ_FIXED, RESP_FIXED, SEQ_*); stepmesh._ucp
 * checks the constants below against it before using this module.
 */
#include "_ucpc.h"

#include <stdlib.h>
#include <structmember.h>

#define SEQ_OFFSET 8 /* protocol.SEQ_OFFSET */
#define SEQ_SHIFT 16 /* protocol.SEQ_SHIFT */
#define SEQ_MASK 0xFFFFFFFFu
#define RESP_FIXED 42     /* protocol.RESP_FIXED.size: version, flags, status, n, seq, 4 stamps */
#define RESP_STATUS_AT 2  /* u16 */
#define RESP_N_AT 4       /* u16 */
#define RESP_SEQ_AT 6     /* u32 */
#define RESP_STAMPS_AT 10 /* 4 x u64 */
#define STAMPS 5          /* per server in a trace: the response's 4, then when its answer was seen complete */

enum { CALL_UNSENT = 1, CALL_SENT, CALL_DONE, CALL_FAILED };
enum { WAIT_DONE = 0, WAIT_PENDING, WAIT_UNKNOWN, WAIT_BAD_TIMEOUT, WAIT_FAILED };
enum { PROBLEM_NONE = 0, PROBLEM_HEADER, PROBLEM_TOO_LONG };

typedef struct {
    uint64_t ptr, n, tag;
} Msg;

typedef struct {
    uint64_t j, dst, cap; /* answer j rides inline; dst 0: UCX scattered it into place */
} Take;

typedef struct {
    uint64_t resp_size, resp_tag, sptr, sn; /* sn 0: the response is received whole, not scattered */
    Py_ssize_t n_pulls, n_takes;
    Msg *pulls;
    Take *takes;
} Part;

#define SIG_MAX 256  /* protocol.MAX_PULLS: tensors per side a remembered signature may have */
#define PLAN_SLOTS 512 /* remembered signatures: a direct-mapped table, by a hash of the call's facts */

/* What a plan depends on of one tensor: a call matches when each of its tensors has the same. */
typedef SmcTensor Sig;

/* One call's host memory; a plan keeps the ones not in use. */
typedef struct Bufs {
    struct Bufs *next;
    uint8_t *hdr;   /* the request header, template written once */
    uint64_t *hiov; /* [hdr, hlen, gathered pieces...] */
    uint8_t **resp; /* per server */
    uint64_t *riov; /* per server: [resp, resp_pos, pull tensor, bytes] */
} Bufs;

typedef struct PlanObject {
    PyObject_HEAD
    PyObject *owner; /* stepmesh.worker._Plan: owns the memory and endpoints these addresses belong to */
    PyObject *event; /* None, or what records a CUDA event before the sends (stepmesh.worker decides) */
    Py_ssize_t n_servers, per, n_gather, n_push, n_recv, n_send;
    uint64_t *eps;
    uint64_t req_tag, hlen, resp_pos;
    uint8_t *template;
    uint64_t *gather;
    Msg *push;
    Part *parts;
    Bufs *free;
    /* the call signature it was built for (set by WorkerCore.remember) */
    uint64_t sig_hash;
    Py_ssize_t sig_push, sig_pull;
    int sig_event;
    int64_t *sig_keys; /* push keys, then pull keys */
    Sig *sigs;         /* push tensors, then pull tensors */
} PlanObject;

typedef struct CallObject {
    PyObject_HEAD
    struct CallObject *next_free;
    TagOpsObject *ops; /* whose worker its operations are on */
    PlanObject *plan; /* held while in flight and until released */
    Bufs *bufs;
    PyObject *keep;   /* the push tensors, until complete */
    PyObject *keep_pull; /* the pull tensors, likewise (a plan holds no tensor: its addresses are checked anew) */
    PyObject *key;    /* its handle as a Python int (the pending dict's key) */
    int64_t handle;
    uint32_t seq;
    int state;
    uint64_t t_start, t_sent, t_end;
    Py_ssize_t cap_reqs, n_reqs, n_recv, cap_servers, n_servers;
    void **req;       /* UCX requests: receives [0, n_recv), then sends; NULL once complete */
    int *status;
    uint64_t *t_done; /* when each was seen complete; 0 when it completed within its call */
    uint64_t *stamps; /* STAMPS per server */
    int *problem;     /* per server, once failed */
    Py_ssize_t *start; /* n_servers + 1: server s's receives are [start[s], start[s+1]) */
} CallObject;

typedef struct {
    PyObject_HEAD
    TagOpsObject *ops;
    PyObject *pending; /* dict: handle -> Call (stepmesh.worker reads it too) */
    PyObject *failed;  /* the last call that completed with a problem, for Python to word */
    PyObject *zombies; /* list: calls whose posting failed half-way, until UCX let go of their buffers */
    Py_ssize_t n_servers, max_in_flight, trace_keep;
    int data_version;
    int64_t next_handle;
    uint32_t seq;
    CallObject **traces; /* ring of trace_keep completed calls, by call number */
    CallObject *free_calls;
    PlanObject *plans[PLAN_SLOTS]; /* by signature hash; a newer plan takes its slot */
    Py_ssize_t n_plans;
    Sig scratch[2 * SIG_MAX];   /* a call's tensors, read once per call */
    int64_t scratch_keys[2 * SIG_MAX];
} WorkerCoreObject;

static PyTypeObject PlanType;
static PyTypeObject CallType;

/* ------------------------------------------------------------------ helpers */

/* ------------------------------------------------------------------- Plan */

static void bufs_free(PlanObject *p, Bufs *b) {
    if (b == NULL)
        return;
    free(b->hdr);
    PyMem_Free(b->hiov);
    if (b->resp != NULL)
        for (Py_ssize_t s = 0; s < p->n_servers; s++)
            free(b->resp[s]);
    PyMem_Free(b->resp);
    PyMem_Free(b->riov);
    PyMem_Free(b);
}

static Bufs *bufs_take(PlanObject *p) {
    Bufs *b = p->free;
    if (b != NULL) {
        p->free = b->next;
        return b;
    }
    b = PyMem_Calloc(1, sizeof(Bufs));
    if (b == NULL)
        return (Bufs *)PyErr_NoMemory();
    b->hdr = malloc(p->hlen ? p->hlen : 1);
    b->hiov = PyMem_Calloc(2 * (1 + p->n_gather), sizeof(uint64_t));
    b->resp = PyMem_Calloc(p->n_servers, sizeof(uint8_t *));
    b->riov = PyMem_Calloc(4 * p->n_servers, sizeof(uint64_t));
    if (b->hdr == NULL || b->hiov == NULL || b->resp == NULL || b->riov == NULL)
        goto nomem;
    memcpy(b->hdr, p->template, p->hlen);
    b->hiov[0] = (uintptr_t)b->hdr;
    b->hiov[1] = p->hlen;
    memcpy(b->hiov + 2, p->gather, 2 * p->n_gather * sizeof(uint64_t));
    for (Py_ssize_t s = 0; s < p->n_servers; s++) {
        Part *part = &p->parts[s];
        if ((b->resp[s] = malloc(part->resp_size)) == NULL)
            goto nomem;
        memset(b->resp[s], 0, part->resp_size);
        b->riov[4 * s] = (uintptr_t)b->resp[s];
        b->riov[4 * s + 1] = p->resp_pos;
        b->riov[4 * s + 2] = part->sptr;
        b->riov[4 * s + 3] = part->sn;
    }
    return b;
nomem:
    bufs_free(p, b);
    return (Bufs *)PyErr_NoMemory();
}

static void bufs_give(PlanObject *p, Bufs *b) {
    b->next = p->free;
    p->free = b;
}

static int Plan_traverse(PlanObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->owner);
    Py_VISIT(self->event);
    return 0;
}

static int Plan_clear(PlanObject *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->event);
    return 0;
}

static void Plan_dealloc(PlanObject *self) {
    PyObject_GC_UnTrack(self);
    Plan_clear(self);
    while (self->free != NULL) {
        Bufs *b = self->free;
        self->free = b->next;
        bufs_free(self, b);
    }
    if (self->parts != NULL)
        for (Py_ssize_t s = 0; s < self->n_servers; s++) {
            PyMem_Free(self->parts[s].pulls);
            PyMem_Free(self->parts[s].takes);
        }
    PyMem_Free(self->parts);
    PyMem_Free(self->eps);
    PyMem_Free(self->template);
    PyMem_Free(self->gather);
    PyMem_Free(self->push);
    PyMem_Free(self->sig_keys);
    PyMem_Free(self->sigs);
    PyObject_GC_Del(self);
}

/* Plan(owner, eps, req_tag, template, gather, push, parts, per, resp_pos, event)
 *   eps: [ucp_ep_h per server]; template: the request header (bytes);
 *   gather: [(ptr, n)] pushes gathered behind it; push: [(ptr, n, tag)] pushes of their own;
 *   parts: per server (resp_size, resp_tag, (ptr, n) or None, [(ptr, n, tag)] pulls, [(j, dst, cap)] takes). */
static PyObject *Plan_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *owner, *eps, *template, *gather, *push, *parts, *event;
    unsigned long long req_tag, resp_pos;
    Py_ssize_t per;
    if (!PyArg_ParseTuple(args, "OO!KSO!O!O!nKO", &owner, &PyList_Type, &eps, &req_tag, &template, &PyList_Type, &gather,
                          &PyList_Type, &push, &PyList_Type, &parts, &per, &resp_pos, &event))
        return NULL;
    PlanObject *p = PyObject_GC_New(PlanObject, type);
    if (p == NULL)
        return NULL;
    p->owner = Py_NewRef(owner);
    p->event = Py_NewRef(event);
    p->n_servers = PyList_GET_SIZE(eps);
    p->per = per;
    p->req_tag = req_tag;
    p->resp_pos = resp_pos;
    p->hlen = (uint64_t)PyBytes_GET_SIZE(template);
    p->eps = NULL;
    p->template = NULL;
    p->gather = NULL;
    p->push = NULL;
    p->parts = NULL;
    p->free = NULL;
    p->n_gather = p->n_push = 0;
    p->sig_push = p->sig_pull = -1;
    p->sig_event = 0;
    p->sig_keys = NULL;
    p->sigs = NULL;
    PyObject_GC_Track(p);
    if (PyList_GET_SIZE(parts) != p->n_servers || p->n_servers == 0) {
        PyErr_SetString(PyExc_ValueError, "Plan: one part per endpoint, at least one");
        goto fail;
    }
    p->eps = PyMem_Calloc(p->n_servers, sizeof(uint64_t));
    p->template = PyMem_Malloc(p->hlen ? p->hlen : 1);
    p->parts = PyMem_Calloc(p->n_servers, sizeof(Part));
    if (p->eps == NULL || p->template == NULL || p->parts == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(p->template, PyBytes_AS_STRING(template), p->hlen);
    if (p->hlen < SEQ_OFFSET + 4) {
        PyErr_SetString(PyExc_ValueError, "Plan: the request header is shorter than its fixed part");
        goto fail;
    }
    for (Py_ssize_t s = 0; s < p->n_servers; s++)
        if (smc_as_u64(PyList_GET_ITEM(eps, s), &p->eps[s], "eps") < 0)
            goto fail;
    if (smc_u64_rows(gather, 2, &p->gather, &p->n_gather, "gather") < 0 ||
        smc_u64_rows(push, 3, (uint64_t **)&p->push, &p->n_push, "push") < 0)
        goto fail;
    p->n_recv = 0;
    for (Py_ssize_t s = 0; s < p->n_servers; s++) {
        PyObject *item = PyList_GET_ITEM(parts, s);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
            PyErr_SetString(PyExc_TypeError, "parts: (resp_size, resp_tag, scatter, pulls, takes) per server");
            goto fail;
        }
        Part *part = &p->parts[s];
        PyObject *scatter = PyTuple_GET_ITEM(item, 2);
        uint64_t sp[2] = {0, 0};
        if (smc_as_u64(PyTuple_GET_ITEM(item, 0), &part->resp_size, "resp_size") < 0 ||
            smc_as_u64(PyTuple_GET_ITEM(item, 1), &part->resp_tag, "resp_tag") < 0 ||
            (scatter != Py_None && smc_u64_tuple(scatter, sp, 2, "scatter") < 0) ||
            smc_u64_rows(PyTuple_GET_ITEM(item, 3), 3, (uint64_t **)&part->pulls, &part->n_pulls, "pulls") < 0 ||
            smc_u64_rows(PyTuple_GET_ITEM(item, 4), 3, (uint64_t **)&part->takes, &part->n_takes, "takes") < 0)
            goto fail;
        part->sptr = sp[0];
        part->sn = sp[1];
        if (part->resp_size < p->resp_pos) {
            PyErr_SetString(PyExc_ValueError, "Plan: a response buffer smaller than its header");
            goto fail;
        }
        for (Py_ssize_t t = 0; t < part->n_takes; t++)
            if (part->takes[t].j >= (uint64_t)per) {
                PyErr_SetString(PyExc_ValueError, "Plan: an inline answer index beyond the answers per server");
                goto fail;
            }
        p->n_recv += 1 + part->n_pulls;
    }
    if (per < 0 || p->resp_pos < RESP_FIXED + 8 * (uint64_t)per) {
        PyErr_SetString(PyExc_ValueError, "Plan: resp_pos leaves no room for the response's fixed part and sizes");
        goto fail;
    }
    p->n_send = p->n_servers * (1 + p->n_push);
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

static PyObject *Plan_get_owner(PlanObject *self, void *closure) { return Py_NewRef(self->owner ? self->owner : Py_None); }

static PyGetSetDef Plan_getset[] = {
    {"owner", (getter)Plan_get_owner, NULL, "The stepmesh.worker._Plan this was built for.", NULL},
    {NULL},
};

static PyMemberDef Plan_members[] = {
    {"event", T_OBJECT, offsetof(PlanObject, event), READONLY, "None, or what records the CUDA event to send after."},
    {NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.Plan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "What every push_pull of one signature sends and receives (built by stepmesh.worker).",
    .tp_new = Plan_new,
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_traverse = (traverseproc)Plan_traverse,
    .tp_clear = (inquiry)Plan_clear,
    .tp_getset = Plan_getset,
    .tp_members = Plan_members,
};

/* ------------------------------------------------------------------- Call */

static void call_arrays_free(CallObject *c) {
    PyMem_Free(c->req);
    PyMem_Free(c->status);
    PyMem_Free(c->t_done);
    PyMem_Free(c->stamps);
    PyMem_Free(c->problem);
    PyMem_Free(c->start);
    c->req = NULL;
    c->status = NULL;
    c->t_done = NULL;
    c->stamps = NULL;
    c->problem = NULL;
    c->start = NULL;
    c->cap_reqs = c->cap_servers = 0;
}

/* Give back what the call holds besides its stamps (buffers, tensors, plan). Only once UCX is done with them. */
static void call_release(CallObject *c) {
    if (c->bufs != NULL) {
        bufs_give(c->plan, c->bufs);
        c->bufs = NULL;
    }
    Py_CLEAR(c->keep);
    Py_CLEAR(c->keep_pull);
    Py_CLEAR(c->key);
}

/* Whether UCX may still use the call's memory (an operation posted and not seen complete). */
static int call_busy(CallObject *c) {
    for (Py_ssize_t i = 0; i < c->n_reqs; i++)
        if (c->req[i] != NULL)
            return 1;
    return 0;
}

/* Cancel and free what is still in flight, and leave what it points at to leak (UCX may still finish
   with that memory): for a call dropped or closed in flight. */
static void call_abandon_memory(CallObject *c) {
    if (c->req == NULL || !call_busy(c))
        return;
    for (Py_ssize_t i = 0; i < c->n_reqs; i++) {
        if (c->req[i] != NULL) {
            if (c->ops != NULL && c->ops->worker_obj != NULL) {
                smc_cancel(c->ops, c->req[i]);
                smc_ucp_free(c->req[i]);
            }
            c->req[i] = NULL;
            c->status[i] = UCS_ERR_CANCELED;
        }
    }
    c->bufs = NULL;
    c->keep = NULL;
    c->keep_pull = NULL;
}

static void Call_dealloc(CallObject *self) {
    call_abandon_memory(self); /* dropped in flight (its pending entry deleted, say) */
    call_release(self);
    Py_CLEAR(self->ops);
    Py_CLEAR(self->plan);
    call_arrays_free(self);
    PyObject_Free(self);
}

static int call_fit(CallObject *c, Py_ssize_t n_reqs, Py_ssize_t n_servers) {
    if (n_reqs > c->cap_reqs || n_servers > c->cap_servers) {
        call_arrays_free(c);
        Py_ssize_t r = n_reqs < 4 ? 4 : n_reqs, s = n_servers < 1 ? 1 : n_servers;
        c->req = PyMem_Calloc(r, sizeof(void *));
        c->status = PyMem_Calloc(r, sizeof(int));
        c->t_done = PyMem_Calloc(r, sizeof(uint64_t));
        c->stamps = PyMem_Calloc(STAMPS * s, sizeof(uint64_t));
        c->problem = PyMem_Calloc(s, sizeof(int));
        c->start = PyMem_Calloc(s + 1, sizeof(Py_ssize_t));
        if (!c->req || !c->status || !c->t_done || !c->stamps || !c->problem || !c->start) {
            call_arrays_free(c);
            PyErr_NoMemory();
            return -1;
        }
        c->cap_reqs = r;
        c->cap_servers = s;
    }
    return 0;
}

/* A Call for plan p: a recycled one when the trace ring let one go. */
static CallObject *call_take(WorkerCoreObject *core, PlanObject *p) {
    CallObject *c = core->free_calls;
    if (c != NULL) {
        core->free_calls = c->next_free;
        c->next_free = NULL;
    } else {
        c = PyObject_New(CallObject, &CallType);
        if (c == NULL)
            return NULL;
        c->next_free = NULL;
        c->ops = NULL;
        c->plan = NULL;
        c->bufs = NULL;
        c->keep = NULL;
        c->keep_pull = NULL;
        c->key = NULL;
        c->req = NULL;
        c->status = NULL;
        c->t_done = NULL;
        c->stamps = NULL;
        c->problem = NULL;
        c->start = NULL;
        c->cap_reqs = c->cap_servers = 0;
    }
    if (call_fit(c, p->n_recv + p->n_send, p->n_servers) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    Py_XSETREF(c->plan, (PlanObject *)Py_NewRef(p));
    if (c->ops != core->ops)
        Py_XSETREF(c->ops, (TagOpsObject *)Py_NewRef(core->ops));
    c->n_servers = p->n_servers;
    c->n_recv = p->n_recv;
    c->n_reqs = p->n_recv;
    memset(c->req, 0, (p->n_recv + p->n_send) * sizeof(void *));
    memset(c->status, 0, (p->n_recv + p->n_send) * sizeof(int));
    c->state = CALL_UNSENT;
    c->t_sent = c->t_end = 0;
    return c;
}

static int record(CallObject *c, Py_ssize_t i, void *h) {
    c->t_done[i] = 0;
    if ((uintptr_t)h >= SMC_ERR_MIN) {
        c->req[i] = NULL;
        c->status[i] = (int)(intptr_t)h;
        return -1;
    }
    c->req[i] = h;
    c->status[i] = h != NULL ? UCS_INPROGRESS : 0;
    return 0;
}

/* The request to every server, then each push of its own; -1 (status in c) when UCX refused one. */
static int call_send(TagOpsObject *ops, CallObject *c) {
    PlanObject *p = c->plan;
    Bufs *b = c->bufs;
    uint64_t bits = (uint64_t)c->seq << SEQ_SHIFT;
    uint64_t tag = p->req_tag | bits;
    Py_ssize_t i = c->n_recv;
    c->n_reqs = c->n_recv + p->n_send;
    for (Py_ssize_t k = i; k < c->n_reqs; k++)
        c->req[k] = NULL, c->status[k] = 0, c->t_done[k] = 0;
    c->state = CALL_SENT;
    for (Py_ssize_t s = 0; s < p->n_servers; s++) {
        void *h = p->n_gather ? smc_send(ops, p->eps[s], (uintptr_t)b->hiov, 1 + p->n_gather, tag, 1)
                              : smc_send(ops, p->eps[s], (uintptr_t)b->hdr, p->hlen, tag, 0);
        if (record(c, i++, h) < 0)
            return -1;
    }
    for (Py_ssize_t m = 0; m < p->n_push; m++) {
        Msg *msg = &p->push[m];
        for (Py_ssize_t s = 0; s < p->n_servers; s++)
            if (record(c, i++, smc_send(ops, p->eps[s], msg->ptr, msg->n, msg->tag | bits, 0)) < 0)
                return -1;
    }
    c->t_sent = smc_now_ns();
    return 0;
}

static int call_recv(TagOpsObject *ops, CallObject *c) {
    PlanObject *p = c->plan;
    Bufs *b = c->bufs;
    uint64_t bits = (uint64_t)c->seq << SEQ_SHIFT;
    Py_ssize_t i = 0;
    for (Py_ssize_t k = 0; k < c->n_recv; k++)
        c->req[k] = NULL, c->status[k] = 0, c->t_done[k] = 0;
    for (Py_ssize_t s = 0; s < p->n_servers; s++) {
        Part *part = &p->parts[s];
        c->start[s] = i;
        void *h = part->sn ? smc_recv(ops, (uintptr_t)(b->riov + 4 * s), 2, part->resp_tag | bits, UINT64_MAX, 1)
                           : smc_recv(ops, (uintptr_t)b->resp[s], part->resp_size, part->resp_tag | bits, UINT64_MAX, 0);
        if (record(c, i++, h) < 0)
            return -1;
        for (Py_ssize_t k = 0; k < part->n_pulls; k++) {
            Msg *msg = &part->pulls[k];
            if (record(c, i++, smc_recv(ops, msg->ptr, msg->n, msg->tag | bits, UINT64_MAX, 0)) < 0)
                return -1;
        }
    }
    c->start[p->n_servers] = i;
    return 0;
}

/* Whether every operation of the call is complete; each gets its t_done when first seen so. */
static int call_settled(TagOpsObject *ops, CallObject *c) {
    int all = c->state != CALL_UNSENT;
    uint64_t now = 0;
    for (Py_ssize_t i = 0; i < c->n_reqs; i++) {
        void *h = c->req[i];
        if (h == NULL)
            continue;
        int st = smc_poll(ops, h);
        if (st == UCS_INPROGRESS) {
            all = 0;
            continue;
        }
        c->req[i] = NULL;
        c->status[i] = st;
        if (now == 0)
            now = smc_now_ns();
        c->t_done[i] = now;
    }
    return all;
}

typedef struct {
    TagOpsObject *ops;
    CallObject *c;
} SettleArgs;

static int settle_call(void *arg) {
    SettleArgs *sa = arg;
    return call_settled(sa->ops, sa->c);
}

/* Cancel what is still in flight; the call stays with its buffers until UCX has let go of all. */
static void call_cancel(TagOpsObject *ops, CallObject *c) {
    for (Py_ssize_t i = 0; i < c->n_reqs; i++)
        if (c->req[i] != NULL)
            smc_cancel(ops, c->req[i]);
}

/* Check every response and copy inline answers out: 0, or -1 with c->problem set (buffers kept). */
static int call_finish(WorkerCoreObject *core, CallObject *c) {
    PlanObject *p = c->plan;
    memset(c->problem, 0, p->n_servers * sizeof(int));
    for (Py_ssize_t i = 0; i < c->n_reqs; i++)
        if (c->status[i] != 0)
            return -1; /* a UCX failure: Python reports it before looking at any response */
    int failed = 0;
    for (Py_ssize_t s = 0; s < p->n_servers; s++) {
        Part *part = &p->parts[s];
        const uint8_t *buf = c->bufs->resp[s];
        uint64_t *st = c->stamps + STAMPS * s;
        uint64_t arrived = c->t_sent;
        for (Py_ssize_t i = c->start[s]; i < c->start[s + 1]; i++)
            if (c->t_done[i] > arrived)
                arrived = c->t_done[i];
        st[4] = arrived;
        c->problem[s] = PROBLEM_NONE;
        if (buf[0] != core->data_version || smc_rd16(buf + RESP_STATUS_AT) != 0 || smc_rd16(buf + RESP_N_AT) != p->per ||
            smc_rd32(buf + RESP_SEQ_AT) != c->seq) {
            c->problem[s] = PROBLEM_HEADER;
            failed = 1;
            continue;
        }
        for (int k = 0; k < 4; k++)
            st[k] = smc_rd64(buf + RESP_STAMPS_AT + 8 * k);
        uint64_t pos = p->resp_pos;
        for (Py_ssize_t t = 0; t < part->n_takes; t++) {
            Take *tk = &part->takes[t];
            uint64_t n = smc_rd64(buf + RESP_FIXED + 8 * tk->j);
            if (n > tk->cap || (tk->dst && pos + n > part->resp_size)) {
                c->problem[s] = PROBLEM_TOO_LONG;
                failed = 1;
                break;
            }
            if (tk->dst) {
                memmove((void *)(uintptr_t)tk->dst, buf + pos, n);
                pos += n;
            }
        }
    }
    c->t_end = smc_now_ns();
    return failed ? -1 : 0;
}

static PyObject *Call_ucx_status(CallObject *self, PyObject *unused) {
    for (Py_ssize_t i = 0; i < self->n_reqs; i++)
        if (self->status[i] != 0 && self->status[i] != UCS_INPROGRESS)
            return PyLong_FromLong(self->status[i]);
    return PyLong_FromLong(0);
}

static PyObject *Call_problems(CallObject *self, PyObject *unused) {
    PyObject *out = PyList_New(self->n_servers);
    for (Py_ssize_t s = 0; out != NULL && s < self->n_servers; s++)
        PyList_SET_ITEM(out, s, PyLong_FromLong(self->state == CALL_FAILED ? self->problem[s] : 0));
    return out;
}

static PyObject *Call_response(CallObject *self, PyObject *arg) {
    Py_ssize_t s = PyLong_AsSsize_t(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    if (self->bufs == NULL || s < 0 || s >= self->n_servers) {
        PyErr_SetString(PyExc_IndexError, "response(): no such server, or the call's buffers are released");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)self->bufs->resp[s], (Py_ssize_t)self->plan->parts[s].resp_size);
}

static PyObject *Call_release(CallObject *self, PyObject *unused) {
    if (self->req != NULL && call_busy(self)) {
        PyErr_SetString(PyExc_RuntimeError, "release(): the call still has operations in flight");
        return NULL;
    }
    call_release(self);
    Py_RETURN_NONE;
}

static PyObject *Call_get_seq(CallObject *self, void *closure) { return PyLong_FromUnsignedLong(self->seq); }
static PyObject *Call_get_handle(CallObject *self, void *closure) { return PyLong_FromLongLong(self->handle); }
static PyObject *Call_get_plan(CallObject *self, void *closure) {
    return Py_NewRef(self->plan && self->plan->owner ? self->plan->owner : Py_None);
}

static PyMethodDef Call_methods[] = {
    {"ucx_status", (PyCFunction)Call_ucx_status, METH_NOARGS, "The first failed UCX status of its operations, or 0."},
    {"problems", (PyCFunction)Call_problems, METH_NOARGS,
     "Per server: 0 fine, 1 a response header that is not an answer to it, 2 an answer too long for its pull tensor."},
    {"response", (PyCFunction)Call_response, METH_O, "response(s) -> bytes: server s's response buffer."},
    {"release", (PyCFunction)Call_release, METH_NOARGS, "Give its buffers back (idempotent)."},
    {NULL},
};

static PyGetSetDef Call_getset[] = {
    {"seq", (getter)Call_get_seq, NULL, "Its sequence number.", NULL},
    {"handle", (getter)Call_get_handle, NULL, "Its push_pull handle.", NULL},
    {"plan", (getter)Call_get_plan, NULL, "The stepmesh.worker._Plan it ran.", NULL},
    {NULL},
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.Call",
    .tp_basicsize = sizeof(CallObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One push_pull: its UCX operations, buffers and trace stamps.",
    .tp_dealloc = (destructor)Call_dealloc,
    .tp_methods = Call_methods,
    .tp_getset = Call_getset,
};

/* ------------------------------------------------------------- WorkerCore */

static void reap_zombies(WorkerCoreObject *core) {
    Py_ssize_t n = PyList_GET_SIZE(core->zombies);
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        CallObject *c = (CallObject *)PyList_GET_ITEM(core->zombies, i);
        c->state = CALL_SENT; /* look at every operation posted */
        if (call_settled(core->ops, c)) {
            c->state = CALL_FAILED;
            call_release(c);
            PySequence_DelItem(core->zombies, i);
        } else {
            c->state = CALL_FAILED;
        }
    }
}

/* A call whose posting UCX refused half-way: cancel the rest, keep it until UCX lets go, raise. */
static PyObject *abandon(WorkerCoreObject *core, CallObject *c) {
    int status = 0;
    for (Py_ssize_t i = 0; i < c->n_reqs && status == 0; i++)
        if (c->status[i] != 0 && c->status[i] != UCS_INPROGRESS)
            status = c->status[i];
    call_cancel(core->ops, c);
    c->state = CALL_FAILED;
    if (c->key != NULL && PyDict_DelItem(core->pending, c->key) < 0)
        PyErr_Clear();
    if (PyList_Append(core->zombies, (PyObject *)c) < 0)
        PyErr_Clear(); /* then it leaks rather than free memory UCX may still write */
    else
        Py_DECREF(c);
    return smc_raise_status(smc_on_refused, status);
}

/* push_pull(plan, push_tensors, pull_tensors, send) -> handle, or None when max_in_flight calls are outstanding */
#define CORE_READY(self)                                                                                       \
    if ((self)->ops == NULL) {                                                                                         \
        PyErr_SetString(PyExc_RuntimeError, "WorkerCore was not initialised");                                       \
        return NULL;                                                                                                   \
    }

static PyObject *Core_push_pull(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CORE_READY(self)
    if (nargs != 4 || Py_TYPE(args[0]) != &PlanType) {
        PyErr_SetString(PyExc_TypeError, "push_pull(plan: Plan, push_tensors, pull_tensors, send: bool)");
        return NULL;
    }
    if (smc_ready(self->ops) < 0)
        return NULL;
    if (PyList_GET_SIZE(self->zombies))
        reap_zombies(self);
    if (PyDict_GET_SIZE(self->pending) >= self->max_in_flight)
        Py_RETURN_NONE;
    PlanObject *p = (PlanObject *)args[0];
    if (p->n_servers != self->n_servers) {
        PyErr_SetString(PyExc_ValueError, "push_pull: a plan for another number of servers");
        return NULL;
    }
    int send = PyObject_IsTrue(args[3]);
    if (send < 0)
        return NULL;
    uint64_t t_start = smc_now_ns();
    CallObject *c = call_take(self, p);
    if (c == NULL)
        return NULL;
    if ((c->bufs = bufs_take(p)) == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    c->t_start = t_start;
    c->seq = self->seq = (self->seq + 1) & SEQ_MASK;
    c->handle = self->next_handle;
    if ((c->key = PyLong_FromLongLong(c->handle)) == NULL) {
        call_release(c);
        Py_DECREF(c);
        return NULL;
    }
    self->next_handle += self->n_servers + 1;
    c->keep = Py_NewRef(args[1]);
    c->keep_pull = Py_NewRef(args[2]);
    memcpy(c->bufs->hdr + SEQ_OFFSET, &c->seq, 4);
    if (PyDict_SetItem(self->pending, c->key, (PyObject *)c) < 0) {
        call_release(c);
        Py_DECREF(c);
        return NULL;
    }
    /* The request leaves first; the receives for its answers follow while it travels
       (an answer cannot come before the request is served; one that did would wait in UCX). */
    if ((send && call_send(self->ops, c) < 0) || call_recv(self->ops, c) < 0)
        return abandon(self, c);
    PyObject *key = Py_NewRef(c->key);
    Py_DECREF(c);
    return key;
}

/* ---------------------------------------------------------- signatures */

static int read_int(PyObject *o, int64_t *out) {
    int overflow;
    if (!PyLong_CheckExact(o))
        return -1;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = v;
    return 0;
}

static int read_bool(PyObject *o) { return o == Py_True ? 1 : o == Py_False ? 0 : -1; }

static int same_sig(const Sig *a, const Sig *b) {
    if (a->ptr != b->ptr || a->nbytes != b->nbytes || a->dtype != b->dtype || a->contig != b->contig ||
        a->cuda != b->cuda || a->ndim != b->ndim)
        return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->dims[d] != b->dims[d])
            return 0;
    return 1;
}

/* Read a call's arguments into the scratch signature: -1 when they are not the plain kind (lists of
   tensors, int keys, a bool) that a remembered plan can match; stepmesh.worker then looks closer. */
static int read_call(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t *n_push, Py_ssize_t *n_pull, int *event) {
    PyObject *push = args[0], *pkeys = args[1], *pull = args[2], *qkeys = args[3];
    if (!PyList_CheckExact(push) || !PyList_CheckExact(pkeys) || !PyList_CheckExact(pull) || !PyList_CheckExact(qkeys))
        return -1;
    Py_ssize_t np = PyList_GET_SIZE(push), nq = PyList_GET_SIZE(pull);
    if (np > SIG_MAX || nq > SIG_MAX || PyList_GET_SIZE(pkeys) != np || PyList_GET_SIZE(qkeys) != nq ||
        (*event = read_bool(args[4])) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < np + nq; i++) {
        PyObject *keys = i < np ? pkeys : qkeys, *list = i < np ? push : pull;
        Py_ssize_t j = i < np ? i : i - np;
        /* torch's getters may run Python code (a subclass, a TorchFunctionMode): hold the item,
           and look at the lists' sizes again each time */
        if (PyList_GET_SIZE(list) <= j || PyList_GET_SIZE(keys) <= j || read_int(PyList_GET_ITEM(keys, j), &self->scratch_keys[i]) < 0)
            return -1;
        PyObject *t = Py_NewRef(PyList_GET_ITEM(list, j));
        int rc = smc_read_tensor(t, &self->scratch[i], i < np);
        Py_DECREF(t);
        if (rc < 0)
            return -1;
    }
    if (PyList_GET_SIZE(push) != np || PyList_GET_SIZE(pull) != nq)
        return -1;
    *n_push = np;
    *n_pull = nq;
    return 0;
}

static int plan_matches(WorkerCoreObject *self, PlanObject *p, Py_ssize_t np, Py_ssize_t nq, int event) {
    if (p->sig_push != np || p->sig_pull != nq || p->sig_event != event)
        return 0;
    if (memcmp(p->sig_keys, self->scratch_keys, (np + nq) * sizeof(int64_t)) != 0)
        return 0;
    for (Py_ssize_t i = 0; i < np + nq; i++)
        if (!same_sig(&p->sigs[i], &self->scratch[i]))
            return 0;
    return 1;
}

static uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

/* A hash of the call read into the scratch signature (what plan_matches then compares in full). */
static uint64_t call_hash(WorkerCoreObject *self, Py_ssize_t np, Py_ssize_t nq, int event) {
    uint64_t h = mix(mix((uint64_t)np, (uint64_t)nq), (uint64_t)event);
    for (Py_ssize_t i = 0; i < np + nq; i++) {
        const Sig *s = &self->scratch[i];
        h = mix(h, s->ptr);
        h = mix(h, s->nbytes);
        h = mix(h, (uintptr_t)s->dtype);
        h = mix(h, ((uint64_t)s->ndim << 2) | ((uint64_t)s->contig << 1) | (uint64_t)s->cuda);
        for (int d = 0; d < s->ndim; d++)
            h = mix(h, (uint64_t)s->dims[d]);
        h = mix(h, (uint64_t)self->scratch_keys[i]);
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

static PyObject *Core_push_pull(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t nargs);

/* call(push_tensors, push_keys, pull_tensors, pull_keys, need_event) -> handle, or None: push_pull when the
   call's signature is one of the plans remembered here (and needs no CUDA event); None leaves it to Python. */
static PyObject *Core_call(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t np, nq;
    int event;
    CORE_READY(self)
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "call(push_tensors, push_keys, pull_tensors, pull_keys, need_event)");
        return NULL;
    }
    if (self->n_plans == 0 || read_call(self, args, &np, &nq, &event) < 0)
        Py_RETURN_NONE;
    uint64_t h = call_hash(self, np, nq, event);
    PlanObject *p = self->plans[h & (PLAN_SLOTS - 1)];
    if (p == NULL || p->sig_hash != h || !plan_matches(self, p, np, nq, event) || p->event != Py_None)
        Py_RETURN_NONE;
    PyObject *pp_args[4] = {(PyObject *)Py_NewRef(p), args[0], args[2], Py_True};
    PyObject *handle = Core_push_pull(self, pp_args, 4);
    Py_DECREF(p);
    return handle;
}

/* remember(plan, push_tensors, push_keys, pull_tensors, pull_keys, need_event): let call() match it. */
static PyObject *Core_remember(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t np, nq;
    int event;
    CORE_READY(self)
    if (nargs != 6 || Py_TYPE(args[0]) != &PlanType) {
        PyErr_SetString(PyExc_TypeError, "remember(plan, push_tensors, push_keys, pull_tensors, pull_keys, need_event)");
        return NULL;
    }
    PlanObject *p = (PlanObject *)args[0];
    if (read_call(self, args + 1, &np, &nq, &event) < 0)
        Py_RETURN_FALSE;
    Py_ssize_t n = np + nq ? np + nq : 1;
    int64_t *keys = PyMem_Malloc(n * sizeof(int64_t));
    Sig *sigs = PyMem_Malloc(n * sizeof(Sig));
    if (keys == NULL || sigs == NULL) {
        PyMem_Free(keys);
        PyMem_Free(sigs);
        return PyErr_NoMemory();
    }
    memcpy(keys, self->scratch_keys, (np + nq) * sizeof(int64_t));
    memcpy(sigs, self->scratch, (np + nq) * sizeof(Sig));
    PyMem_Free(p->sig_keys);
    PyMem_Free(p->sigs);
    p->sig_keys = keys;
    p->sigs = sigs;
    p->sig_push = np;
    p->sig_pull = nq;
    p->sig_event = event;
    p->sig_hash = call_hash(self, np, nq, event);
    PlanObject **slot = &self->plans[p->sig_hash & (PLAN_SLOTS - 1)];
    if (*slot != p) {
        if (*slot == NULL)
            self->n_plans++;
        Py_XSETREF(*slot, (PlanObject *)Py_NewRef(p));
    }
    Py_RETURN_TRUE;
}

static void forget_plans(WorkerCoreObject *self) {
    for (Py_ssize_t i = 0; i < PLAN_SLOTS; i++)
        Py_CLEAR(self->plans[i]);
    self->n_plans = 0;
}

static PyObject *Core_forget_plans(WorkerCoreObject *self, PyObject *unused) {
    forget_plans(self);
    Py_RETURN_NONE;
}

static CallObject *pending_call(WorkerCoreObject *self, PyObject *handle) {
    if (!PyLong_CheckExact(handle))
        return NULL;
    PyObject *c = PyDict_GetItemWithError(self->pending, handle);
    if (c == NULL || Py_TYPE(c) != &CallType) {
        PyErr_Clear();
        return NULL;
    }
    return (CallObject *)c;
}

/* send(handle): post the sends of a call made with send=False (its CUDA event has completed). */
static PyObject *Core_send(WorkerCoreObject *self, PyObject *handle) {
    CORE_READY(self)
    CallObject *c = pending_call(self, handle);
    if (c == NULL || c->state != CALL_UNSENT) {
        PyErr_Format(PyExc_KeyError, "send(): %R is not a call waiting to be sent", handle);
        return NULL;
    }
    Py_INCREF(c);
    if (call_send(self->ops, c) < 0)
        return abandon(self, c);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

static void trace_keep(WorkerCoreObject *self, CallObject *c) {
    int64_t k = (c->handle - 1) / (self->n_servers + 1);
    CallObject **slot = &self->traces[k % self->trace_keep];
    CallObject *old = *slot;
    *slot = (CallObject *)Py_NewRef(c);
    if (old != NULL) {
        if (Py_REFCNT(old) == 1) { /* nobody else looks at it: recycle */
            old->next_free = self->free_calls;
            self->free_calls = old;
        } else {
            Py_DECREF(old);
        }
    }
}

/* wait(handle, timeout_ms, spins) -> WAIT_*: busy-polls at most ``spins`` progress steps. */
static PyObject *Core_wait(WorkerCoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CORE_READY(self)
    uint64_t spins;
    if (nargs != 3 || smc_as_u64(args[2], &spins, "spins") < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "wait(handle, timeout_ms, spins)");
        return NULL;
    }
    PyObject *timeout = args[1];
    int overflow = 0;
    long long ms = PyLong_CheckExact(timeout) ? PyLong_AsLongLongAndOverflow(timeout, &overflow) : -1;
    if (!((PyLong_CheckExact(timeout) && (overflow > 0 || (overflow == 0 && ms >= 0))) ||
          (PyFloat_CheckExact(timeout) && PyFloat_AS_DOUBLE(timeout) >= 0))) {
        PyErr_Clear();
        return PyLong_FromLong(WAIT_BAD_TIMEOUT); /* Python looks closer (an int subclass, say) */
    }
    CallObject *c = pending_call(self, args[0]);
    if (c == NULL)
        return PyLong_FromLong(WAIT_UNKNOWN);
    Py_INCREF(c);
    SettleArgs sa = {self->ops, c};
    if (!smc_spin(self->ops, spins, settle_call, &sa)) {
        Py_DECREF(c);
        return PyLong_FromLong(WAIT_PENDING);
    }
    if (PyDict_DelItem(self->pending, c->key) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    int finished = call_finish(self, c); /* copies inline answers into the pull tensors: still held */
    Py_CLEAR(c->keep);
    Py_CLEAR(c->keep_pull);
    if (finished < 0) {
        c->state = CALL_FAILED;
        Py_XSETREF(self->failed, (PyObject *)c);
        return PyLong_FromLong(WAIT_FAILED);
    }
    c->state = CALL_DONE;
    call_release(c);
    Py_CLEAR(c->plan); /* a trace keeps its stamps only: plans (and their buffers) go when nothing else uses them */
    trace_keep(self, c);
    Py_DECREF(c);
    return PyLong_FromLong(WAIT_DONE);
}

static PyObject *Core_take_failed(WorkerCoreObject *self, PyObject *unused) {
    PyObject *c = self->failed;
    self->failed = NULL;
    return c != NULL ? c : Py_NewRef(Py_None);
}

/* waiting(handle) -> indexes of the servers whose answer is not complete yet, or None (unknown handle). */
static PyObject *Core_waiting(WorkerCoreObject *self, PyObject *handle) {
    CORE_READY(self)
    CallObject *c = pending_call(self, handle);
    if (c == NULL)
        Py_RETURN_NONE;
    call_settled(self->ops, c);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t s = 0; out != NULL && s < c->n_servers; s++) {
        for (Py_ssize_t i = c->start[s]; i < c->start[s + 1]; i++) {
            if (c->req[i] != NULL) {
                PyObject *v = PyLong_FromSsize_t(s);
                if (v == NULL || PyList_Append(out, v) < 0)
                    Py_CLEAR(out);
                Py_XDECREF(v);
                break;
            }
        }
    }
    return out;
}

/* trace(handle) -> per server [t_start, t_sent, 4 response stamps, seen complete, t_end], or None. */
static PyObject *Core_trace(WorkerCoreObject *self, PyObject *handle) {
    CORE_READY(self)
    long long h = PyLong_CheckExact(handle) ? PyLong_AsLongLong(handle) : -1;
    if (h < 1) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int64_t k = (h - 1) / (self->n_servers + 1);
    CallObject *c = self->traces[k % self->trace_keep];
    if (c == NULL || c->handle != h)
        Py_RETURN_NONE;
    PyObject *out = PyList_New(c->n_servers);
    for (Py_ssize_t s = 0; out != NULL && s < c->n_servers; s++) {
        uint64_t *st = c->stamps + STAMPS * s;
        PyObject *row = Py_BuildValue("[KKKKKKKK]", (unsigned long long)c->t_start, (unsigned long long)c->t_sent,
                                      (unsigned long long)st[0], (unsigned long long)st[1], (unsigned long long)st[2],
                                      (unsigned long long)st[3], (unsigned long long)st[4], (unsigned long long)c->t_end);
        if (row == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, s, row);
    }
    return out;
}

/* close(): cancel and free every operation in flight (before the UCX worker goes). */
static PyObject *Core_close(WorkerCoreObject *self, PyObject *unused) {
    if (self->ops == NULL || self->ops->worker_obj == NULL)
        Py_RETURN_NONE;
    PyObject *calls = PyDict_Values(self->pending);
    if (calls == NULL)
        return NULL;
    if (PySequence_InPlaceConcat(calls, self->zombies) == NULL) {
        Py_DECREF(calls);
        return NULL;
    }
    Py_DECREF(calls); /* InPlaceConcat returned a new reference to the same list */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(calls); i++) {
        CallObject *c = (CallObject *)PyList_GET_ITEM(calls, i);
        call_abandon_memory(c); /* UCX may still finish with their memory while the worker is torn down */
        c->state = CALL_FAILED;
        call_release(c);
    }
    Py_DECREF(calls);
    PyDict_Clear(self->pending);
    return PyList_SetSlice(self->zombies, 0, PyList_GET_SIZE(self->zombies), NULL) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *Core_get_next_handle(WorkerCoreObject *self, void *closure) {
    return PyLong_FromLongLong(self->next_handle);
}

static PyObject *Core_get_pending(WorkerCoreObject *self, void *closure) {
    CORE_READY(self)
    return Py_NewRef(self->pending);
}

static int Core_init(WorkerCoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ops", "pending", "n_servers", "data_version", "max_in_flight", "trace_keep", NULL};
    PyObject *ops, *pending;
    Py_ssize_t n_servers, max_in_flight, keep;
    int version;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!ninn", kwlist, &SmcTagOpsType, &ops, &PyDict_Type, &pending,
                                     &n_servers, &version, &max_in_flight, &keep))
        return -1;
    if (self->ops != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WorkerCore is already initialised");
        return -1;
    }
    if (smc_tensor_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "stepmesh._ucpc.bind_torch() was not called");
        return -1;
    }
    if (smc_ready((TagOpsObject *)ops) < 0)
        return -1;
    if (n_servers < 1 || max_in_flight < 1 || keep < 1) {
        PyErr_SetString(PyExc_ValueError, "WorkerCore: n_servers, max_in_flight and trace_keep must be >= 1");
        return -1;
    }
    self->traces = PyMem_Calloc(keep, sizeof(CallObject *));
    self->zombies = PyList_New(0);
    if (self->traces == NULL || self->zombies == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->ops = (TagOpsObject *)Py_NewRef(ops);
    self->pending = Py_NewRef(pending);
    self->n_servers = n_servers;
    self->data_version = version;
    self->max_in_flight = max_in_flight;
    self->trace_keep = keep;
    self->next_handle = 1;
    self->seq = 0;
    return 0;
}

static PyObject *Core_close(WorkerCoreObject *self, PyObject *unused);

static void Core_dealloc(WorkerCoreObject *self) {
    if (self->ops != NULL) { /* what is still in flight is cancelled, its memory left to leak */
        PyObject *r = Core_close(self, NULL);
        if (r == NULL)
            PyErr_WriteUnraisable((PyObject *)self);
        Py_XDECREF(r);
    }
    forget_plans(self);
    if (self->traces != NULL) {
        for (Py_ssize_t i = 0; i < self->trace_keep; i++)
            Py_XDECREF(self->traces[i]);
        PyMem_Free(self->traces);
    }
    while (self->free_calls != NULL) {
        CallObject *c = self->free_calls;
        self->free_calls = c->next_free;
        Py_DECREF(c);
    }
    Py_XDECREF(self->failed);
    Py_XDECREF(self->zombies);
    Py_XDECREF(self->pending);
    Py_XDECREF(self->ops);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Core_methods[] = {
    {"push_pull", (PyCFunction)(void (*)(void))Core_push_pull, METH_FASTCALL,
     "push_pull(plan, push_tensors, pull_tensors, send) -> handle, or None at max_in_flight: post one call of "
     "``plan`` (its sends only with ``send``; else send(handle) later). The two lists stay referenced until the "
     "call is complete (not a copy of them: the caller must not change them meanwhile)."},
    {"call", (PyCFunction)(void (*)(void))Core_call, METH_FASTCALL,
     "call(push_tensors, push_keys, pull_tensors, pull_keys, need_event) -> handle, or None: push_pull when the "
     "arguments match a remembered plan's signature (and it needs no CUDA event)."},
    {"remember", (PyCFunction)(void (*)(void))Core_remember, METH_FASTCALL,
     "remember(plan, push_tensors, push_keys, pull_tensors, pull_keys, need_event) -> bool: call() matches "
     "these arguments to plan from now on (False: they are not of the kind it matches)."},
    {"forget_plans", (PyCFunction)Core_forget_plans, METH_NOARGS, "Forget every remembered plan (endpoints changed)."},
    {"send", (PyCFunction)Core_send, METH_O, "send(handle): post the sends of a call made with send=False."},
    {"wait", (PyCFunction)(void (*)(void))Core_wait, METH_FASTCALL,
     "wait(handle, timeout_ms, spins) -> 0 done, 1 pending, 2 unknown handle, 3 bad timeout_ms, 4 failed "
     "(take_failed() has the call). Busy-polls at most ``spins`` progress steps; timeout_ms is only checked."},
    {"take_failed", (PyCFunction)Core_take_failed, METH_NOARGS, "The call the last wait() reported failed (or None)."},
    {"waiting", (PyCFunction)Core_waiting, METH_O, "waiting(handle) -> servers not answered yet, or None."},
    {"trace", (PyCFunction)Core_trace, METH_O, "trace(handle) -> per-server stamps of a completed call, or None."},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "Cancel and free every operation in flight."},
    {NULL},
};

static PyGetSetDef Core_getset[] = {
    {"next_handle", (getter)Core_get_next_handle, NULL, "The handle the next push_pull gets.", NULL},
    {"pending", (getter)Core_get_pending, NULL, "handle -> Call of every call not waited for yet.", NULL},
    {NULL},
};

static PyTypeObject WorkerCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stepmesh._ucpc.WorkerCore",
    .tp_basicsize = sizeof(WorkerCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WorkerCore(ops, pending, n_servers, data_version, max_in_flight, trace_keep): push_pull's steady state.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

int smc_add_worker_types(PyObject *m) {
    if (PyType_Ready(&PlanType) < 0 || PyType_Ready(&CallType) < 0 || PyType_Ready(&WorkerCoreType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Plan", (PyObject *)&PlanType) < 0 ||
        PyModule_AddObjectRef(m, "Call", (PyObject *)&CallType) < 0 ||
        PyModule_AddObjectRef(m, "WorkerCore", (PyObject *)&WorkerCoreType) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "SEQ_OFFSET", SEQ_OFFSET) < 0 || PyModule_AddIntConstant(m, "SEQ_SHIFT", SEQ_SHIFT) < 0 ||
        PyModule_AddIntConstant(m, "RESP_FIXED", RESP_FIXED) < 0)
        return -1;
    return 0;
}
