/* Shared by the C parts of stepmesh._ucpc: the libucp calls, the tag operations'
 * object, and the helpers the worker and server cores use.
 *
 * Nothing here links against UCX or needs its headers: the function addresses
 * come from the libucp that ucxx loaded (stepmesh._ucp binds them once).
 */
#ifndef STEPMESH_UCPC_H
#define STEPMESH_UCPC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define UCS_INPROGRESS 1
#define UCS_ERR_CANCELED (-16)
#define SMC_ERR_MIN ((uintptr_t)-256) /* pointers at or above this are UCS_PTR_STATUS(errors) */
#define SMC_PARAM_WORDS 16            /* ucp_request_param_t is 72 bytes on LP64 (UCX 1.21); zeros past it */

typedef void *(*smc_send_fn)(void *ep, const void *buf, size_t count, uint64_t tag, const void *param);
typedef void *(*smc_recv_fn)(void *worker, void *buf, size_t count, uint64_t tag, uint64_t mask, const void *param);
typedef int (*smc_check_fn)(void *req);
typedef void (*smc_free_fn)(void *req);
typedef void (*smc_cancel_fn)(void *worker, void *req);
typedef unsigned (*smc_progress_fn)(void *worker);

/* One libucp per process: bound once by stepmesh._ucp (bind()). */
extern smc_send_fn smc_ucp_send;
extern smc_recv_fn smc_ucp_recv;
extern smc_check_fn smc_ucp_check;
extern smc_free_fn smc_ucp_free;
extern smc_cancel_fn smc_ucp_cancel;
extern smc_progress_fn smc_ucp_progress;
extern PyObject *smc_on_refused; /* callable(status): raises UcpError for a refused operation */
extern PyObject *smc_on_failed;  /* callable(status): raises UcpError for a failed one */

typedef struct TagOpsObject TagOpsObject;

typedef struct RequestObject {
    PyObject_HEAD
    void *h; /* the UCX request while in flight, else NULL */
    int status;
    uint64_t t_done; /* CLOCK_MONOTONIC ns when seen complete (time.monotonic_ns); 0: completed within its call */
    TagOpsObject *ops; /* while in flight: its list holds a reference to this request */
    struct RequestObject *prev, *next;
} RequestObject;

struct TagOpsObject {
    PyObject_HEAD
    void *worker;
    PyObject *worker_obj; /* the ucxx worker, kept alive */
    int release_gil;      /* another thread (ucxx's progress thread) may hold the worker */
    uint64_t param[SMC_PARAM_WORDS];
    uint64_t iov_param[SMC_PARAM_WORDS];
    RequestObject live; /* sentinel of the list of Request objects in flight */
    Py_ssize_t n_live;
    RequestObject *done; /* what an operation that completed within its call returns */
};

extern PyTypeObject SmcTagOpsType;

uint64_t smc_now_ns(void);

/* Raise through ``callback(status)``; always returns NULL. */
PyObject *smc_raise_status(PyObject *callback, long status);

/* The raw libucp calls on a TagOps' worker, the GIL let go around them when
 * another thread may progress it. A post returns a request, NULL (complete
 * within the call) or an error status pointer (>= SMC_ERR_MIN). */
void *smc_send(TagOpsObject *ops, uint64_t ep, uint64_t buf, uint64_t count, uint64_t tag, int iov);
void *smc_recv(TagOpsObject *ops, uint64_t buf, uint64_t count, uint64_t tag, uint64_t mask, int iov);
/* UCS_INPROGRESS, or the final status (the request is then freed). */
int smc_poll(TagOpsObject *ops, void *h);
void smc_cancel(TagOpsObject *ops, void *h);
unsigned smc_progress(TagOpsObject *ops);
/* The busy-poll: progress the worker (draining it while it reports work) for at most ``spins`` steps, asking
   ``settled(arg)`` first, after UCX moved something and every 4th idle step; its last answer (1 done, 0 not
   yet, negative: an error is set). */
int smc_spin(TagOpsObject *ops, uint64_t spins, int (*settled)(void *), void *arg);

/* A non-negative int below 2**64 (TypeError naming ``name`` otherwise). */
int smc_as_u64(PyObject *o, uint64_t *out, const char *name);
int smc_ready(TagOpsObject *ops);
/* A tuple of n such ints into out; a list of them (n == 1: of plain ints) into a fresh array of n_out * n
   (PyMem_Free it, also when this fails). TypeError naming ``what`` otherwise. */
int smc_u64_tuple(PyObject *item, uint64_t *out, Py_ssize_t n, const char *what);
int smc_u64_rows(PyObject *list, Py_ssize_t n, uint64_t **out, Py_ssize_t *n_out, const char *what);

/* Little-endian fields of the wire headers (x86-64 and aarch64 are little-endian; memcpy: unaligned). */
static inline uint16_t smc_rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline uint32_t smc_rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint64_t smc_rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static inline void smc_wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void smc_wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void smc_wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

#define SMC_MAX_NDIM 8 /* protocol.MAX_NDIM */

/* What the cores read off a torch tensor (its shape only when asked for). */
typedef struct {
    uint64_t ptr, nbytes;
    PyObject *dtype; /* torch dtypes are never freed: compared by identity, not referenced */
    int ndim, contig, cuda;
    int64_t dims[SMC_MAX_NDIM];
} SmcTensor;

/* Read t's data pointer, bytes, contiguity, device and dtype (and shape) with torch's own getters:
   0, or -1 with no error set when t is not a plain tensor (or its getters fail). */
int smc_read_tensor(PyObject *t, SmcTensor *out, int shape);

/* The worker and server cores (their own files). */
int smc_add_worker_types(PyObject *module);
int smc_add_server_types(PyObject *module);

/* torch objects the cores compare against, bound by stepmesh._ucp (bind_torch()). */
extern PyObject *smc_tensor_type;  /* torch.Tensor */
extern PyObject *smc_dtypes;       /* dict: torch.dtype -> wire code */
extern PyObject *smc_str_data_ptr, *smc_str_is_contiguous, *smc_str_nbytes, *smc_str_is_cuda, *smc_str_dtype,
    *smc_str_shape;

#endif
