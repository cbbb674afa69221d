/* The floor of one alltoallv on this machine: the same exchange as
 * bench/alltoallv.py's contenders, done by a minimal C loop with no Python.
 * Built by the benchmark into a shared library and called through ctypes
 * inside the same mpirun job, so it runs side by side with the others.
 *
 *   direct   every rank's receive slots live in an MPI-3 shared window; a
 *            sender stores its payload into its slot on the peer and
 *            publishes it with a release store of the slot's sequence word;
 *            the receiver spins with acquire loads, then either reads the
 *            data in place or copies it out into a receive buffer.
 *   fabric   one fi_writedata per peer per iteration into the peer's
 *            registered slots (libfabric shm or tcp;ofi_rxm), the data read
 *            in place; completion once every peer's remote CQ entry and our
 *            own writes' completions are in.
 *
 *   pull     the single-copy design MPI's vader uses: every rank publishes
 *            its send buffer's address once, and each iteration a receiver
 *            reads its part straight from the sender's buffer with one
 *            process_vm_readv (CMA) into its receive buffer, then tells the
 *            sender; a sender's iteration ends once every peer has read it.
 *            It tells whether a pull path could beat the push design here.
 *
 *   handoff  the one-way latency of handing a cache line from one core to
 *            another: rank 0 and rank 1 of the node take turns writing one
 *            shared word. On a VM it says where the host has put the two
 *            vCPUs; a slow handoff means every byte one rank writes and the
 *            other reads crosses between dies (see docs/scaling.md).
 *
 * Slots are two deep per sender: every rank waits for all its peers each
 * iteration, so no sender is ever more than one iteration ahead.
 * Each *_run returns the seconds per iteration measured on this rank.
 */
#define _GNU_SOURCE /* process_vm_readv */
#include <mpi.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define HEADER 64 /* sequence word, padded to a cache line */

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

/* ---- the node's ranks, a shared window, and the buffers ------------------ */

typedef struct {
    MPI_Comm node;
    MPI_Win win;
    int rank, size;
    size_t nbytes;     /* per peer */
    char **peer;       /* per node rank: its part of the shared window */
    char *send, *recv; /* nbytes per rank each */
} node_t;

/* Split off the node's ranks, give each `fixed + per_rank * node ranks` bytes
 * (zeroed) of a shared window that all of them map, and fill the send buffer. */
static void node_open(node_t *n, MPI_Fint comm_f, size_t nbytes, size_t fixed, size_t per_rank)
{
    char *base;
    size_t window_bytes;
    MPI_Comm_split_type(MPI_Comm_f2c(comm_f), MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &n->node);
    MPI_Comm_rank(n->node, &n->rank);
    MPI_Comm_size(n->node, &n->size);
    n->nbytes = nbytes;
    window_bytes = fixed + per_rank * (size_t)n->size;
    MPI_Win_allocate_shared((MPI_Aint)window_bytes, 64, MPI_INFO_NULL, n->node, &base, &n->win);
    memset(base, 0, window_bytes);
    n->peer = calloc(n->size, sizeof(char *));
    for (int p = 0; p < n->size; p++) {
        MPI_Aint sz;
        int disp;
        MPI_Win_shared_query(n->win, p, &sz, &disp, &n->peer[p]);
    }
    n->send = malloc(nbytes * n->size + 1);
    n->recv = malloc(nbytes * n->size + 1);
    memset(n->send, n->rank + 1, nbytes * n->size);
    memset(n->recv, 0, nbytes * n->size);
}

static void node_close(node_t *n)
{
    MPI_Win_free(&n->win);
    MPI_Comm_free(&n->node);
    free(n->peer);
    free(n->send);
    free(n->recv);
}

/* ---- direct shared mapping ---------------------------------------------- */

typedef struct {
    node_t n;
    size_t slot;
    uint64_t seq;
} direct_t;

void *floor_direct_open(MPI_Fint comm_f, size_t nbytes)
{
    direct_t *d = calloc(1, sizeof(*d));
    d->slot = HEADER + round_up(nbytes, 64);
    node_open(&d->n, comm_f, nbytes, 0, 2 * d->slot); /* two slots per sender */
    MPI_Barrier(d->n.node);
    return d;
}

double floor_direct_run(void *h, int iters, int copy_out)
{
    direct_t *d = h;
    node_t *n = &d->n;
    int P = n->size, r = n->rank;
    volatile char sink = 0;
    double t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = ++d->seq;
        size_t depth = seq & 1;
        for (int k = 0; k < P; k++) {
            int p = (r + k) % P;
            char *s = n->peer[p] + (depth * P + r) * d->slot;
            memcpy(s + HEADER, n->send + p * n->nbytes, n->nbytes);
            __atomic_store_n((uint64_t *)s, seq, __ATOMIC_RELEASE);
        }
        for (int k = 0; k < P; k++) {
            int p = (r + P - k) % P;
            char *s = n->peer[r] + (depth * P + p) * d->slot;
            while (__atomic_load_n((uint64_t *)s, __ATOMIC_ACQUIRE) != seq)
                sched_yield();
            if (copy_out)
                memcpy(n->recv + p * n->nbytes, s + HEADER, n->nbytes);
            else if (n->nbytes)
                sink = s[HEADER];
        }
    }
    (void)sink;
    return (MPI_Wtime() - t0) / iters;
}

void floor_direct_close(void *h)
{
    node_close(&((direct_t *)h)->n);
    free(h);
}

/* ---- single-copy pull (CMA) --------------------------------------------- */

typedef struct {
    node_t n;        /* window per rank: its posted word, then one pulled word per sender */
    pid_t *pid;
    uint64_t *addr;  /* per rank: its send buffer's address */
    uint64_t seq;
    char error[256];
} pull_t;

#define WORD(d, owner, i) ((uint64_t *)(d)->n.peer[owner] + 8 * (i)) /* a cache line each */

void *floor_pull_open(MPI_Fint comm_f, size_t nbytes)
{
    pull_t *d = calloc(1, sizeof(*d));
    uint64_t mine[2];
    node_open(&d->n, comm_f, nbytes, 64, 64); /* posted word, then a pulled word per sender */
    mine[0] = (uint64_t)getpid();
    mine[1] = (uint64_t)(uintptr_t)d->n.send;
    uint64_t *all = malloc(2 * sizeof(uint64_t) * d->n.size);
    MPI_Allgather(mine, 2, MPI_UINT64_T, all, 2, MPI_UINT64_T, d->n.node);
    d->pid = calloc(d->n.size, sizeof(pid_t));
    d->addr = calloc(d->n.size, sizeof(uint64_t));
    for (int p = 0; p < d->n.size; p++) {
        d->pid[p] = (pid_t)all[2 * p];
        d->addr[p] = all[2 * p + 1];
    }
    free(all);
    MPI_Barrier(d->n.node);
    return d;
}

const char *floor_pull_error(void *h) { return ((pull_t *)h)->error; }

double floor_pull_run(void *h, int iters)
{
    pull_t *d = h;
    node_t *nd = &d->n;
    int P = nd->size, r = nd->rank;
    size_t n = nd->nbytes;
    double t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = ++d->seq;
        __atomic_store_n(WORD(d, r, 0), seq, __ATOMIC_RELEASE); /* posted */
        memcpy(nd->recv + r * n, nd->send + r * n, n);
        for (int k = 1; k < P; k++) {
            int p = (r + k) % P;
            while (__atomic_load_n(WORD(d, p, 0), __ATOMIC_ACQUIRE) < seq)
                sched_yield();
            struct iovec local = {nd->recv + p * n, n};
            struct iovec remote = {(void *)(uintptr_t)(d->addr[p] + r * n), n};
            if (n && process_vm_readv(d->pid[p], &local, 1, &remote, 1, 0) != (ssize_t)n) {
                snprintf(d->error, sizeof d->error, "process_vm_readv from node rank %d: %s", p,
                         strerror(errno));
                return -1;
            }
            __atomic_store_n(WORD(d, p, 1 + r), seq, __ATOMIC_RELEASE); /* pulled from p */
        }
        /* Our send buffer is free again once every peer has read its part. */
        for (int k = 1; k < P; k++) {
            int p = (r + k) % P;
            while (__atomic_load_n(WORD(d, r, 1 + p), __ATOMIC_ACQUIRE) < seq)
                sched_yield();
        }
    }
    return (MPI_Wtime() - t0) / iters;
}

void floor_pull_close(void *h)
{
    pull_t *d = h;
    node_close(&d->n);
    free(d->pid);
    free(d->addr);
    free(d);
}

/* ---- cache-line handoff ------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nanoseconds per one-way handoff between node ranks 0 and 1, on node rank 0:
 * the median of 15 bursts of `iters` round trips, so a burst in which the
 * scheduler put both ranks on one core does not decide it. 0 on other ranks
 * and when the node has one rank. */
double floor_handoff_ns(MPI_Fint comm_f, int iters)
{
    MPI_Comm comm = MPI_Comm_f2c(comm_f), node;
    MPI_Win win;
    volatile uint64_t *word;
    int rank, size;
    double bursts[15], ns = 0;
    uint64_t turn = 0;
    MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &rank);
    MPI_Comm_size(node, &size);
    MPI_Win_allocate_shared(rank == 0 ? 64 : 0, 64, MPI_INFO_NULL, node, (void *)&word, &win);
    if (rank != 0) {
        MPI_Aint sz;
        int disp;
        MPI_Win_shared_query(win, 0, &sz, &disp, (void *)&word);
    } else {
        *word = 0;
    }
    MPI_Barrier(node);
    if (size > 1 && rank < 2) {
        /* Rank 0 writes odd values, rank 1 even ones; each waits for the other. */
        for (int b = 0; b < 15; b++) {
            double t0 = MPI_Wtime();
            for (int i = 0; i < iters; i++, turn++) {
                uint64_t want = 2 * turn + (uint64_t)rank, spins = 0;
                while (__atomic_load_n(word, __ATOMIC_ACQUIRE) != want)
                    if (++spins % 4096 == 0)
                        sched_yield(); /* sharing a core: let the other rank run */
                __atomic_store_n(word, want + 1, __ATOMIC_RELEASE);
            }
            bursts[b] = (MPI_Wtime() - t0) / (2.0 * iters) * 1e9;
        }
        qsort(bursts, 15, sizeof bursts[0], cmp_double);
        if (rank == 0)
            ns = bursts[7];
    }
    MPI_Barrier(node);
    MPI_Win_free(&win);
    MPI_Comm_free(&node);
    return ns;
}

/* ---- libfabric writedata ------------------------------------------------- */

typedef struct {
    int rank, size;
    size_t nbytes, slot;
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    struct fid_mr *rx_mr, *tx_mr;
    char *rx, *tx;
    fi_addr_t *addr;
    uint64_t *ring, *key; /* per peer: where our slots sit on it, its key */
    struct fi_context *ctx;
    uint64_t seq;
    int arrived[2];       /* remote writes landed, by sequence parity */
    int completed;        /* own writes completed */
    int virt_addr;
    char error[256];
} fabric_t;

static int fail(fabric_t *f, const char *what, long ret)
{
    snprintf(f->error, sizeof f->error, "%s: %s (%ld)", what, fi_strerror((int)-ret), ret);
    return -1;
}

const char *floor_fabric_error(void *h) { return ((fabric_t *)h)->error; }

static int poll_cq(fabric_t *f)
{
    struct fi_cq_data_entry e[16];
    ssize_t n = fi_cq_read(f->cq, e, 16);
    if (n == -FI_EAGAIN)
        return 0;
    if (n < 0)
        return fail(f, "fi_cq_read", n);
    for (ssize_t k = 0; k < n; k++) {
        if ((e[k].flags & FI_REMOTE_WRITE) && (e[k].flags & FI_REMOTE_CQ_DATA))
            f->arrived[e[k].data & 1]++;
        else
            f->completed++;
    }
    return (int)n;
}

/* Returns the handle; on failure too, with floor_fabric_error() non-empty. */
void *floor_fabric_open(MPI_Fint comm_f, size_t nbytes, const char *provider)
{
    MPI_Comm comm = MPI_Comm_f2c(comm_f);
    fabric_t *f = calloc(1, sizeof(*f));
    struct fi_info *hints = fi_allocinfo();
    int ret;
    MPI_Comm_rank(comm, &f->rank);
    MPI_Comm_size(comm, &f->size);
    f->nbytes = nbytes;
    f->slot = round_up(nbytes ? nbytes : 8, 64);
    hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
    hints->mode = FI_CONTEXT;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
    hints->domain_attr->cq_data_size = 4;
    hints->fabric_attr->prov_name = strdup(provider);
    ret = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &f->info);
    fi_freeinfo(hints);
    if (ret)
        return fail(f, "fi_getinfo", ret), f;
    f->virt_addr = (f->info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0;
    struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_DATA, .wait_obj = FI_WAIT_NONE};
    struct fi_av_attr av_attr = {.type = FI_AV_TABLE, .count = (size_t)f->size};
    if ((ret = fi_fabric(f->info->fabric_attr, &f->fabric, NULL)) ||
        (ret = fi_domain(f->fabric, f->info, &f->domain, NULL)) ||
        (ret = fi_cq_open(f->domain, &cq_attr, &f->cq, NULL)) ||
        (ret = fi_av_open(f->domain, &av_attr, &f->av, NULL)) ||
        (ret = fi_endpoint(f->domain, f->info, &f->ep, NULL)) ||
        (ret = fi_ep_bind(f->ep, &f->cq->fid, FI_TRANSMIT | FI_RECV)) ||
        (ret = fi_ep_bind(f->ep, &f->av->fid, 0)) || (ret = fi_enable(f->ep)))
        return fail(f, "endpoint set-up", ret), f;
    size_t rx_bytes = 2 * (size_t)f->size * f->slot, tx_bytes = (size_t)f->size * f->slot;
    if (posix_memalign((void **)&f->rx, 4096, rx_bytes) || posix_memalign((void **)&f->tx, 4096, tx_bytes))
        return fail(f, "posix_memalign", -FI_ENOMEM), f;
    memset(f->rx, 0, rx_bytes);
    memset(f->tx, f->rank + 1, tx_bytes);
    if ((ret = fi_mr_reg(f->domain, f->rx, rx_bytes, FI_REMOTE_WRITE, 0, 1, 0, &f->rx_mr, NULL)) ||
        (ret = fi_mr_reg(f->domain, f->tx, tx_bytes, FI_WRITE, 0, 2, 0, &f->tx_mr, NULL)))
        return fail(f, "fi_mr_reg", ret), f;
    /* Exchange endpoint names, region addresses and keys. */
    char name[256];
    size_t len = sizeof name;
    if ((ret = fi_getname(&f->ep->fid, name, &len)))
        return fail(f, "fi_getname", ret), f;
    char *names = malloc(256 * f->size);
    uint64_t mine[2] = {(uint64_t)(uintptr_t)f->rx, fi_mr_key(f->rx_mr)};
    uint64_t *theirs = malloc(2 * sizeof(uint64_t) * f->size);
    MPI_Allgather(name, 256, MPI_BYTE, names, 256, MPI_BYTE, comm);
    MPI_Allgather(mine, 2, MPI_UINT64_T, theirs, 2, MPI_UINT64_T, comm);
    f->addr = calloc(f->size, sizeof(fi_addr_t));
    f->ring = calloc(f->size, sizeof(uint64_t));
    f->key = calloc(f->size, sizeof(uint64_t));
    f->ctx = calloc(f->size, sizeof(struct fi_context));
    for (int p = 0; p < f->size; p++) {
        if (fi_av_insert(f->av, names + 256 * p, 1, &f->addr[p], 0, NULL) != 1)
            return fail(f, "fi_av_insert", -FI_EINVAL), f;
        f->ring[p] = (f->virt_addr ? theirs[2 * p] : 0);
        f->key[p] = theirs[2 * p + 1];
    }
    free(names);
    free(theirs);
    return f;
}

double floor_fabric_run(void *h, int iters)
{
    fabric_t *f = h;
    int P = f->size, r = f->rank;
    void *desc = fi_mr_desc(f->tx_mr);
    double t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        uint64_t seq = ++f->seq;
        int depth = (int)(seq & 1);
        for (int k = 1; k < P; k++) {
            int p = (r + k) % P;
            uint64_t target = f->ring[p] + ((size_t)depth * P + r) * f->slot;
            ssize_t ret;
            while ((ret = fi_writedata(f->ep, f->tx + p * f->slot, f->nbytes, desc, seq & 0xffff,
                                       f->addr[p], target, f->key[p], &f->ctx[p])) == -FI_EAGAIN)
                if (poll_cq(f) < 0)
                    return -1;
            if (ret)
                return fail(f, "fi_writedata", ret);
        }
        memcpy(f->rx + ((size_t)depth * P + r) * f->slot, f->tx + r * f->slot, f->nbytes);
        while (f->arrived[depth] < P - 1 || f->completed < P - 1) {
            int n = poll_cq(f);
            if (n < 0)
                return -1;
            if (n == 0)
                sched_yield();
        }
        f->arrived[depth] -= P - 1;
        f->completed -= P - 1;
    }
    return (MPI_Wtime() - t0) / iters;
}

void floor_fabric_close(void *h)
{
    fabric_t *f = h;
    if (f->ep) fi_close(&f->ep->fid);
    if (f->rx_mr) fi_close(&f->rx_mr->fid);
    if (f->tx_mr) fi_close(&f->tx_mr->fid);
    if (f->av) fi_close(&f->av->fid);
    if (f->cq) fi_close(&f->cq->fid);
    if (f->domain) fi_close(&f->domain->fid);
    if (f->fabric) fi_close(&f->fabric->fid);
    if (f->info) fi_freeinfo(f->info);
    free(f->rx);
    free(f->tx);
    free(f->addr);
    free(f->ring);
    free(f->key);
    free(f->ctx);
    free(f);
}
