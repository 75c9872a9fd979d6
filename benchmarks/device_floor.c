/*
 * device_floor: what each way of moving StepMesh's messages costs in UCX itself, without stepmesh.
 *
 * Two processes (forked, a socketpair between them) ping-pong the same bytes each way; each mode is
 * one way of carrying a payload (StepMesh's hidden state) and, in some modes, a 4-byte count beside it:
 *
 *   tag              the payload as one tag message (raw UCX's pattern: the floor of tag messages)
 *   hdr              a 64-byte host header + the payload (two tag messages)
 *   hdr-lane         a header + the count on a second context whose rendezvous threshold is 0 (the
 *                    device lane) + the payload: stepmesh's messages today
 *   hdr-lane-late    the same messages, the receiver posting the count's and payload's receives only
 *                    once the header is in (as stepmesh's server does: the header says where they go)
 *   put              the payload written into the peer's buffer (ucp_put_nbx), the endpoint flushed,
 *                    then the header: one-sided, the receiver only takes the header
 *   put-count        the payload and the count put, one flush, then the header
 *   put-fence        the payload put, ucp_worker_fence, the header at once (no wait for the flush)
 *   put-count-fence  the payload and the count put, a fence, the header
 *   hdr-iov          a header + one tag message of an iov [payload, count] (both device memory when --mem cuda):
 *                    the count carried with the payload, no lane
 *   put-req          the request one-sided (put-count-fence), the answer as hdr-lane: what writing pushes into
 *                    a server's registered buffers would give with the answers left as they are
 *
 * Before timing, every mode is checked: the sender writes a fresh value into the first and last words of
 * its payload and into the count, and the receiver reads them back once its messages are complete.
 * Modes are interleaved round by round; p50/p99 of the round trip are printed, with each mode's p50
 * over `tag`'s.
 *
 *   cc -O2 benchmarks/device_floor.c -I$UCX/include -L$UCX/lib -Wl,-rpath,$UCX/lib -lucp -lucs -ldl \
 *      -o /tmp/device_floor    (UCX = the libucx wheel's folder)
 *   /tmp/device_floor --mem cuda --size 917504 --iters 2000 --rounds 5 [--modes tag,hdr-lane,put-count]
 *
 * --hint gives every operation its buffer's memory type (UCP_OP_ATTR_FIELD_MEMORY_TYPE) instead of letting UCX
 * detect it. --memh gives every operation on the main context its buffer's memory handle (UCP_OP_ATTR_FIELD_MEMH,
 * from the ucp_mem_map the buffers get anyway), which also carries the type (not the iov's entries; the count's
 * buffers are mapped on the lane's context as well, for the lane's operations, as stepmesh maps them). --mem host maps its buffers with UCP_MEM_MAP_ALLOCATE (shared memory the peer can write into).
 */
#define _GNU_SOURCE
#include <ucp/api/ucp.h>
#include <dlfcn.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HDR 64
#define COUNT 4
#define TAG_PAYLOAD 1
#define TAG_HDR 2
#define TAG_COUNT 3

enum { M_TAG, M_HDR, M_HDR_LANE, M_HDR_LANE_LATE, M_PUT, M_PUT_COUNT, M_PUT_FENCE, M_PUT_COUNT_FENCE, M_HDR_IOV,
       M_PUT_REQ, N_MODES };
static const char *mode_name[N_MODES] = {"tag", "hdr", "hdr-lane", "hdr-lane-late", "put", "put-count", "put-fence",
                                         "put-count-fence", "hdr-iov", "put-req"};

typedef unsigned long long CUdeviceptr;
static struct {
    int (*init)(unsigned);
    int (*device_get)(int *, int);
    int (*retain)(void **, int);
    int (*set_current)(void *);
    int (*alloc)(CUdeviceptr *, size_t);
    int (*dtoh)(void *, CUdeviceptr, size_t);
    int (*memset32)(CUdeviceptr, unsigned, size_t);
    int (*sync)(void);
    int (*ptr_attr)(void *, int, CUdeviceptr);
} cu;

#define CHECK(what, cond)                                                        \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "rank %d: %s failed (%s:%d)\n", rank, what, __FILE__, __LINE__); \
            exit(1);                                                             \
        }                                                                        \
    } while (0)
#define UCS(what, st) CHECK(what, (st) == UCS_OK)

static int rank, sock, device_mem;
static size_t size = 917504;
static int iters = 2000, rounds = 5, warmup = 200;

typedef struct {
    ucp_context_h ctx;
    ucp_worker_h worker;
    ucp_ep_h ep;
} Side;
static Side main_, lane;

typedef struct {
    void *addr;
    ucp_mem_h memh;
    ucp_rkey_h peer_rkey;
    uint64_t peer_addr;
    ucp_request_param_t param;  /* --memh: this buffer's handle (and --hint's type) */
    ucp_mem_h lane_memh;  /* the count's buffers: mapped on the lane's context too */
    ucp_request_param_t lane_param;
} Buf;
static Buf send_payload, recv_payload, send_count, recv_count;
static ucp_request_param_t no_param = {.op_attr_mask = 0};
static ucp_request_param_t *p_host = &no_param, *p_dev = &no_param;  /* --hint: each op says its memory type */
static ucp_request_param_t hint_host, hint_dev;
static char send_hdr[HDR], recv_hdr[HDR];

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void xfer(void *out, size_t n, const void *in) {  /* send n bytes to the peer, then read n of its */
    CHECK("write", write(sock, in, n) == (ssize_t)n);
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(sock, (char *)out + got, n - got);
        CHECK("read", r > 0);
        got += r;
    }
}

static void xfer_blob(void **out, size_t *out_n, const void *in, size_t n) {
    uint64_t mine = n, theirs;
    xfer(&theirs, 8, &mine);
    *out = malloc(theirs);
    *out_n = theirs;
    CHECK("write", write(sock, in, n) == (ssize_t)n);
    size_t got = 0;
    while (got < theirs) {
        ssize_t r = read(sock, (char *)*out + got, theirs - got);
        CHECK("read", r > 0);
        got += r;
    }
}

static void side_init(Side *s, const char *rndv_thresh) {
    ucp_config_t *cfg;
    UCS("ucp_config_read", ucp_config_read(NULL, NULL, &cfg));
    if (rndv_thresh) UCS("config RNDV_THRESH", ucp_config_modify(cfg, "RNDV_THRESH", rndv_thresh));
    ucp_params_t p = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_TAG | UCP_FEATURE_RMA};
    UCS("ucp_init", ucp_init(&p, cfg, &s->ctx));
    ucp_config_release(cfg);
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE, .thread_mode = UCS_THREAD_MODE_SINGLE};
    UCS("ucp_worker_create", ucp_worker_create(s->ctx, &wp, &s->worker));
    ucp_address_t *addr;
    size_t len;
    UCS("ucp_worker_get_address", ucp_worker_get_address(s->worker, &addr, &len));
    void *peer;
    size_t peer_len;
    xfer_blob(&peer, &peer_len, addr, len);
    ucp_ep_params_t ep = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS, .address = peer};
    UCS("ucp_ep_create", ucp_ep_create(s->worker, &ep, &s->ep));
    ucp_worker_release_address(s->worker, addr);
    free(peer);
}

static void *dev_alloc(size_t n) {
    CUdeviceptr p;
    CHECK("cuMemAlloc", cu.alloc(&p, n) == 0);
    return (void *)(uintptr_t)p;
}

static void buf_init(Buf *b, size_t n, int exposed) {
    ucp_mem_map_params_t mp = {.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
                               .length = n};
    if (device_mem) {
        b->addr = dev_alloc(n);
        mp.address = b->addr;
    } else {
        mp.address = NULL;
        mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_FLAGS;
        mp.flags = UCP_MEM_MAP_ALLOCATE;
    }
    UCS("ucp_mem_map", ucp_mem_map(main_.ctx, &mp, &b->memh));
    ucp_mem_attr_t attr = {.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS};
    UCS("ucp_mem_query", ucp_mem_query(b->memh, &attr));
    b->addr = attr.address;
    /* every process announces the buffer the peer writes into */
    void *rkey = NULL, *peer;
    size_t rkey_len = 0, peer_len;
    uint64_t mine = (uint64_t)(uintptr_t)b->addr;
    if (exposed) UCS("ucp_rkey_pack", ucp_rkey_pack(main_.ctx, b->memh, &rkey, &rkey_len));
    xfer(&b->peer_addr, 8, &mine);
    xfer_blob(&peer, &peer_len, rkey, rkey_len);
    if (peer_len) UCS("ucp_ep_rkey_unpack", ucp_ep_rkey_unpack(main_.ep, peer, &b->peer_rkey));
    b->param = *p_dev;
    b->param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    b->param.memh = b->memh;
    if (rkey) ucp_rkey_buffer_release(rkey);
    free(peer);
}

static void lane_map(Buf *b) {  /* as stepmesh maps a count it sends or receives on its lane */
    ucp_mem_map_params_t mp = {.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
                               .address = b->addr, .length = 256};
    UCS("ucp_mem_map (lane)", ucp_mem_map(lane.ctx, &mp, &b->lane_memh));
    b->lane_param = *p_dev;
    b->lane_param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    b->lane_param.memh = b->lane_memh;
}

static void progress(void) {
    ucp_worker_progress(main_.worker);
    ucp_worker_progress(lane.worker);
}

static void wait_req(void *r, const char *what) {
    if (r == NULL) return;
    CHECK(what, !UCS_PTR_IS_ERR(r));
    ucs_status_t st;
    while ((st = ucp_request_check_status(r)) == UCS_INPROGRESS) progress();
    UCS(what, st);
    ucp_request_free(r);
}

static int use_memh;
static ucp_dt_iov_t send_iov[2], recv_iov[2];
static ucp_request_param_t iov_param;

static const ucp_request_param_t *dev_param(Buf *b) { return use_memh ? &b->param : p_dev; }
static const ucp_request_param_t *lane_param(Buf *b) { return use_memh && b->lane_memh ? &b->lane_param : p_dev; }

#define MAX_OPS 4
typedef struct {
    void *r[MAX_OPS];
    int n;
} Ops;

static void ops_wait(Ops *o, const char *what) {
    for (int i = 0; i < o->n; i++) wait_req(o->r[i], what);
    o->n = 0;
}

static void post_recvs(int mode, Ops *o) {
    ucp_worker_h w = main_.worker;
    o->n = 0;
    if (mode == M_PUT_REQ) mode = rank == 0 ? M_HDR_LANE : M_PUT_COUNT_FENCE;  /* rank 0 sends the requests */
    if (mode == M_HDR_LANE_LATE) {  /* the header alone; the rest once it is in */
        wait_req(ucp_tag_recv_nbx(w, recv_hdr, HDR, TAG_HDR, ~0ULL, p_host), "header");
        o->r[o->n++] = ucp_tag_recv_nbx(w, recv_payload.addr, size, TAG_PAYLOAD, ~0ULL, dev_param(&recv_payload));
        o->r[o->n++] = ucp_tag_recv_nbx(lane.worker, recv_count.addr, COUNT, TAG_COUNT, ~0ULL, lane_param(&recv_count));
        return;
    }
    if (mode != M_TAG) o->r[o->n++] = ucp_tag_recv_nbx(w, recv_hdr, HDR, TAG_HDR, ~0ULL, p_host);
    if (mode == M_TAG || mode == M_HDR || mode == M_HDR_LANE)
        o->r[o->n++] = ucp_tag_recv_nbx(w, recv_payload.addr, size, TAG_PAYLOAD, ~0ULL, dev_param(&recv_payload));
    if (mode == M_HDR_IOV) o->r[o->n++] = ucp_tag_recv_nbx(w, recv_iov, 2, TAG_PAYLOAD, ~0ULL, &iov_param);
    if (mode == M_HDR_LANE)
        o->r[o->n++] = ucp_tag_recv_nbx(lane.worker, recv_count.addr, COUNT, TAG_COUNT, ~0ULL, lane_param(&recv_count));
}

static void send_msgs(int mode, Ops *o) {
    ucp_ep_h ep = main_.ep;
    o->n = 0;
    if (mode == M_PUT_REQ) mode = rank == 0 ? M_PUT_COUNT_FENCE : M_HDR_LANE;
    switch (mode) {
    case M_TAG:
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_payload.addr, size, TAG_PAYLOAD, dev_param(&send_payload));
        return;
    case M_HDR_IOV:
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_hdr, HDR, TAG_HDR, p_host);
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_iov, 2, TAG_PAYLOAD, &iov_param);
        return;
    case M_HDR:
    case M_HDR_LANE:
    case M_HDR_LANE_LATE:
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_hdr, HDR, TAG_HDR, p_host);
        if (mode != M_HDR)
            o->r[o->n++] = ucp_tag_send_nbx(lane.ep, send_count.addr, COUNT, TAG_COUNT, lane_param(&send_count));
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_payload.addr, size, TAG_PAYLOAD, dev_param(&send_payload));
        return;
    default:
        o->r[o->n++] = ucp_put_nbx(ep, send_payload.addr, size, recv_payload.peer_addr, recv_payload.peer_rkey,
                                   dev_param(&send_payload));
        if (mode == M_PUT_COUNT || mode == M_PUT_COUNT_FENCE)
            o->r[o->n++] = ucp_put_nbx(ep, send_count.addr, COUNT, recv_count.peer_addr, recv_count.peer_rkey,
                                       dev_param(&send_count));
        if (mode == M_PUT_FENCE || mode == M_PUT_COUNT_FENCE) {
            UCS("ucp_worker_fence", ucp_worker_fence(main_.worker));
        } else {
            ops_wait(o, "put");
            wait_req(ucp_ep_flush_nbx(ep, &no_param), "flush");
        }
        o->r[o->n++] = ucp_tag_send_nbx(ep, send_hdr, HDR, TAG_HDR, p_host);
    }
}

static void fill(Buf *b, size_t n, unsigned v) {
    if (device_mem) {
        CHECK("cuMemsetD32", cu.memset32((CUdeviceptr)(uintptr_t)b->addr, v, n / 4) == 0);
        CHECK("cuCtxSynchronize", cu.sync() == 0);
    } else {
        for (size_t i = 0; i < n / 4; i++) ((unsigned *)b->addr)[i] = v;
    }
}

static unsigned word(Buf *b, size_t at) {
    unsigned v;
    if (device_mem)
        CHECK("cuMemcpyDtoH", cu.dtoh(&v, (CUdeviceptr)(uintptr_t)b->addr + at, 4) == 0);
    else
        memcpy(&v, (char *)b->addr + at, 4);
    return v;
}

static int has_count(int mode) {
    return mode == M_HDR_LANE || mode == M_HDR_LANE_LATE || mode == M_PUT_COUNT || mode == M_PUT_COUNT_FENCE ||
           mode == M_HDR_IOV || mode == M_PUT_REQ;
}

static void verify(int mode, unsigned want, unsigned seq) {
    unsigned a = word(&recv_payload, 0), b = word(&recv_payload, size - 4);
    unsigned c = has_count(mode) ? word(&recv_count, 0) : want;
    if (a != want || b != want || c != want) {
        fprintf(stderr, "rank %d: mode %s, round trip %u: payload %u..%u, count %u, expected %u\n", rank,
                mode_name[mode], seq, a, b, c, want);
        exit(2);
    }
}

/* one round trip; rank 0 sends first. check: fill before sending, verify the moment the messages are in */
static void round_trip(int mode, int check, unsigned seq) {
    Ops rx, tx;
    if (rank == 0) {
        if (check) { fill(&send_payload, size, seq * 2 + 1); fill(&send_count, COUNT, seq * 2 + 1); }
        if (mode == M_HDR_LANE_LATE) {  /* the answer's receives wait for its header: send first */
            send_msgs(mode, &tx);
            post_recvs(mode, &rx);
        } else {
            post_recvs(mode, &rx);
            send_msgs(mode, &tx);
        }
        ops_wait(&rx, "receive");
        if (check) verify(mode, seq * 2 + 2, seq);
        ops_wait(&tx, "send");
    } else {
        post_recvs(mode, &rx);
        ops_wait(&rx, "receive");
        if (check) {
            verify(mode, seq * 2 + 1, seq);
            fill(&send_payload, size, seq * 2 + 2);
            fill(&send_count, COUNT, seq * 2 + 2);
        }
        send_msgs(mode, &tx);
        ops_wait(&tx, "send");
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bind_cuda(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    CHECK("dlopen libcuda.so.1", lib);
    cu.init = dlsym(lib, "cuInit");
    cu.device_get = dlsym(lib, "cuDeviceGet");
    cu.retain = dlsym(lib, "cuDevicePrimaryCtxRetain");
    cu.set_current = dlsym(lib, "cuCtxSetCurrent");
    cu.alloc = dlsym(lib, "cuMemAlloc_v2");
    cu.dtoh = dlsym(lib, "cuMemcpyDtoH_v2");
    cu.memset32 = dlsym(lib, "cuMemsetD32_v2");
    cu.sync = dlsym(lib, "cuCtxSynchronize");
    cu.ptr_attr = dlsym(lib, "cuPointerGetAttribute");
    CHECK("CUDA symbols", cu.init && cu.device_get && cu.retain && cu.set_current && cu.alloc && cu.dtoh &&
                              cu.memset32 && cu.sync && cu.ptr_attr);
    int dev;
    void *ctx;
    CHECK("cuInit", cu.init(0) == 0);
    CHECK("cuDeviceGet", cu.device_get(&dev, 0) == 0);
    CHECK("cuDevicePrimaryCtxRetain", cu.retain(&ctx, dev) == 0);
    CHECK("cuCtxSetCurrent", cu.set_current(ctx) == 0);
}

int main(int argc, char **argv) {
    int modes[N_MODES], n_modes = 0, cpus[2] = {-1, -1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("device_floor [--mem host|cuda] [--size BYTES] [--iters N] [--rounds N] [--warmup N] [--cpus A,B]\n"
                   "             [--hint] [--memh]\n"
                   "             [--modes tag,hdr,hdr-lane,hdr-lane-late,put,put-count,put-fence,put-count-fence,hdr-iov,put-req]\n"
                   "(the comment at the top of benchmarks/device_floor.c says what each mode moves)\n");
            return 0;
        }
        if (!strcmp(a, "--mem")) { device_mem = !strcmp(v, "cuda"); i++; }
        else if (!strcmp(a, "--size")) { size = strtoull(v, NULL, 0); i++; }
        else if (!strcmp(a, "--iters")) { iters = atoi(v); i++; }
        else if (!strcmp(a, "--rounds")) { rounds = atoi(v); i++; }
        else if (!strcmp(a, "--warmup")) { warmup = atoi(v); i++; }
        else if (!strcmp(a, "--hint")) {
            hint_host.op_attr_mask = hint_dev.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE;
            hint_host.memory_type = UCS_MEMORY_TYPE_HOST;
            hint_dev.memory_type = UCS_MEMORY_TYPE_CUDA;  /* set to host below for --mem host */
            p_host = &hint_host;
            p_dev = &hint_dev;
        }
        else if (!strcmp(a, "--memh")) use_memh = 1;
        else if (!strcmp(a, "--cpus")) { sscanf(v, "%d,%d", &cpus[0], &cpus[1]); i++; }
        else if (!strcmp(a, "--modes")) {
            char *s = strdup(v), *tok;
            for (tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
                int m;
                for (m = 0; m < N_MODES && strcmp(tok, mode_name[m]); m++) {}
                if (m == N_MODES) { fprintf(stderr, "unknown mode %s\n", tok); return 2; }
                modes[n_modes++] = m;
            }
            i++;
        } else { fprintf(stderr, "unknown argument %s (see the comment at the top of device_floor.c)\n", a); return 2; }
    }
    if (!device_mem) hint_dev.memory_type = UCS_MEMORY_TYPE_HOST;
    if (!n_modes) for (int m = 0; m < N_MODES; m++) modes[n_modes++] = m;
    if (size < 8 || size % 4) { fprintf(stderr, "--size: a multiple of 4, at least 8\n"); return 2; }

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror("socketpair"); return 1; }
    pid_t child = fork();
    rank = child == 0 ? 1 : 0;
    sock = sv[rank];
    close(sv[1 - rank]);
    if (cpus[rank] >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[rank], &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    if (device_mem) bind_cuda();
    side_init(&main_, NULL);
    side_init(&lane, "0");
    buf_init(&send_payload, size, 0);
    buf_init(&recv_payload, size, 1);
    buf_init(&send_count, 256, 0);
    buf_init(&recv_count, 256, 1);
    lane_map(&send_count);
    lane_map(&recv_count);
    memset(send_hdr, 7, HDR);
    send_iov[0] = (ucp_dt_iov_t){send_payload.addr, size};
    send_iov[1] = (ucp_dt_iov_t){send_count.addr, COUNT};
    recv_iov[0] = (ucp_dt_iov_t){recv_payload.addr, size};
    recv_iov[1] = (ucp_dt_iov_t){recv_count.addr, COUNT};
    iov_param = *p_dev;
    iov_param.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    iov_param.datatype = ucp_dt_make_iov();

    if (device_mem && rank == 0) {  /* what stepmesh's check that a mapped buffer's allocation holds costs a call */
        unsigned long long id = 0;
        double t0 = now_us();
        for (int i = 0; i < 100000; i++)
            CHECK("cuPointerGetAttribute", cu.ptr_attr(&id, 7 /* BUFFER_ID */, (CUdeviceptr)(uintptr_t)send_payload.addr) == 0);
        printf("device_floor: cuPointerGetAttribute(BUFFER_ID) %.3f us a call\n", (now_us() - t0) / 100000);
    }
    unsigned seq = 0;
    for (int k = 0; k < n_modes; k++)
        for (int i = 0; i < 20; i++) round_trip(modes[k], 1, seq++);
    double *samples[N_MODES];
    for (int k = 0; k < n_modes; k++) samples[k] = malloc(sizeof(double) * iters * rounds);
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < n_modes; k++) {
            for (int i = 0; i < warmup; i++) round_trip(modes[k], 0, 0);
            for (int i = 0; i < iters; i++) {
                double t0 = now_us();
                round_trip(modes[k], 0, 0);
                samples[k][r * iters + i] = now_us() - t0;
            }
        }
    }
    char done = 1;
    xfer(&done, 1, &done);
    if (rank == 0) {
        int n = iters * rounds;
        double base = 0;
        printf("device_floor: %s memory, %zu bytes each way, %d round trips in %d rounds per mode (checked first)\n",
               device_mem ? "cuda" : "host", size, n, rounds);
        printf("%-16s %10s %10s %10s\n", "mode", "p50 us", "p99 us", "/ tag");
        for (int k = 0; k < n_modes; k++) {
            qsort(samples[k], n, sizeof(double), cmp);
            double p50 = samples[k][n / 2], p99 = samples[k][(int)(n * 0.99)];
            if (modes[k] == M_TAG) base = p50;
            printf("%-16s %10.1f %10.1f", mode_name[modes[k]], p50, p99);
            if (base > 0) printf(" %9.2fx", p50 / base);
            printf("\n");
        }
        waitpid(child, NULL, 0);
    }
    return 0;
}
