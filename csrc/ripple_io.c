/* The I/O engine: a layer's read requests are issued together and waited for as a batch, with at
 * most `io_threads` in flight (the queue depth): through io_uring where the kernel allows it, else
 * through a pool of reader threads (a batch of one request is read by the caller itself). With
 * O_DIRECT, transfers go through 4 KiB-aligned bounce buffers. */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_io.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RIPPLE_IO_ALIGN 4096u              /* O_DIRECT offset/length/buffer alignment (>= logical block) */
#define RIPPLE_IO_BOUNCE (1u << 20)        /* largest O_DIRECT transfer per pread through a bounce buffer (each reader thread and io_uring slot has one; touched as used) */

static pthread_mutex_t g_io_mu = PTHREAD_MUTEX_INITIALIZER;   /* pool state */
static pthread_mutex_t g_batch_mu = PTHREAD_MUTEX_INITIALIZER; /* one batch at a time */
static pthread_cond_t  g_io_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t  g_io_done = PTHREAD_COND_INITIALIZER;
static int             g_io_threads = RIPPLE_DEFAULT_IO_THREADS; /* setting: queue depth */
static int             g_io_started;     /* workers running */
static pthread_t       g_io_tid[RIPPLE_MAX_IO_THREADS];
static uint64_t        g_io_gen;         /* batch generation */
static const ripple_io_req * g_io_reqs;
static int             g_io_n;
static int             g_io_next;        /* next request to take */
static int             g_io_finished;    /* requests done */
static int             g_io_rc;
static uint64_t        g_io_bytes;       /* device bytes of the batch */
static const char *    g_io_path;

static __thread uint8_t * t_bounce; /* per-thread aligned buffer of RIPPLE_IO_BOUNCE bytes */

/* Read len bytes at off through O_DIRECT: aligned ranges into the bounce buffer, copied out.
 * Adds the bytes the device transferred to *dev_bytes. */
static int read_direct(int fd, uint8_t * dst, size_t len, uint64_t off, const char * path, uint64_t * dev_bytes,
                       int in_place) {
    if (in_place) { /* aligned offset and destination: no bounce, no copy */
        const size_t alen = (len + RIPPLE_IO_ALIGN - 1) & ~(size_t) (RIPPLE_IO_ALIGN - 1);
        size_t got = 0;
        while (got < len) {
            ssize_t r = pread(fd, dst + got, alen - got, (off_t) (off + got));
            if (r < 0) {
                if (errno == EINTR) {
                    continue;
                }
                ripple_set_error("%s: direct read of %zu bytes at offset %llu failed: %s", path, alen - got,
                                 (unsigned long long) (off + got), strerror(errno));
                return -1;
            }
            if (r == 0) {
                break;
            }
            got += (size_t) r;
            if (got % RIPPLE_IO_ALIGN) {
                break; /* short read: end of file */
            }
        }
        *dev_bytes += got;
        if (got < len) {
            ripple_set_error("%s: read of %zu bytes at offset %llu hit the end of the file "
                             "(file truncated or modified after loading?)", path, len, (unsigned long long) off);
            return -1;
        }
        return 0;
    }
    if (!t_bounce && posix_memalign((void **) &t_bounce, RIPPLE_IO_ALIGN, RIPPLE_IO_BOUNCE) != 0) {
        t_bounce = NULL;
        ripple_set_error("out of memory for an O_DIRECT buffer");
        return -1;
    }
    while (len > 0) {
        const uint64_t a0 = off & ~(uint64_t) (RIPPLE_IO_ALIGN - 1);
        const size_t head = (size_t) (off - a0);
        size_t chunk = len < RIPPLE_IO_BOUNCE - head ? len : RIPPLE_IO_BOUNCE - head;
        const size_t alen = (head + chunk + RIPPLE_IO_ALIGN - 1) & ~(size_t) (RIPPLE_IO_ALIGN - 1);
        size_t got = 0;
        while (got < head + chunk) {
            ssize_t r = pread(fd, t_bounce + got, alen - got, (off_t) (a0 + got));
            if (r < 0) {
                if (errno == EINTR) {
                    continue;
                }
                ripple_set_error("%s: direct read of %zu bytes at offset %llu failed: %s", path, alen - got,
                                 (unsigned long long) (a0 + got), strerror(errno));
                return -1;
            }
            if (r == 0) {
                break;
            }
            got += (size_t) r;
            if (got % RIPPLE_IO_ALIGN) {
                break; /* short read: end of file */
            }
        }
        *dev_bytes += got;
        if (got < head + chunk) {
            ripple_set_error("%s: read of %zu bytes at offset %llu hit the end of the file "
                             "(file truncated or modified after loading?)", path, chunk, (unsigned long long) off);
            return -1;
        }
        memcpy(dst, t_bounce + head, chunk);
        dst += chunk;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

/* a buffered read: pread until done */
int ripple_pread_full(int fd, void * dst, size_t size, uint64_t offset, const char * path) {
    uint8_t * p = dst;
    size_t done = 0;
    while (done < size) {
        ssize_t r = pread(fd, p + done, size - done, (off_t) (offset + done));
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            ripple_set_error("%s: read of %zu bytes at offset %llu failed: %s", path, size,
                             (unsigned long long) offset, strerror(errno));
            return -1;
        }
        if (r == 0) {
            ripple_set_error("%s: read of %zu bytes at offset %llu hit the end of the file after %zu bytes "
                             "(file truncated or modified after loading?)",
                             path, size, (unsigned long long) offset, done);
            return -1;
        }
        done += (size_t) r;
    }
    return 0;
}

static int run_one(const ripple_io_req * r, const char * path, uint64_t * dev_bytes) {
    if (r->direct) {
        return read_direct(r->fd, r->dst, r->len, r->offset, path, dev_bytes, r->direct == 2);
    }
    *dev_bytes += r->len;
    return ripple_pread_full(r->fd, r->dst, r->len, r->offset, path);
}

/* Take requests of the current batch until none is left; g_io_mu held on entry and exit. */
static void drain(void) {
    while (g_io_reqs && g_io_next < g_io_n) {
        const ripple_io_req * r = &g_io_reqs[g_io_next++];
        const char * path = g_io_path;
        pthread_mutex_unlock(&g_io_mu);
        uint64_t bytes = 0;
        int rc = run_one(r, path, &bytes);
        pthread_mutex_lock(&g_io_mu);
        g_io_bytes += bytes;
        if (rc != 0) {
            g_io_rc = -1;
        }
        if (++g_io_finished == g_io_n) {
            pthread_cond_broadcast(&g_io_done);
        }
    }
}

static void * io_worker(void * arg) {
    const int id = (int) (intptr_t) arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&g_io_mu);
    for (;;) {
        while (g_io_gen == seen || !g_io_reqs) {
            pthread_cond_wait(&g_io_work, &g_io_mu);
        }
        seen = g_io_gen;
        if (id < g_io_threads - 1) { /* workers above a lowered setting stay idle */
            drain();
        }
    }
    return NULL;
}

/* workers = threads - 1: the caller is one of the readers */
static void ensure_workers(void) {
    const int want = g_io_threads - 1;
    while (g_io_started < want) {
        if (pthread_create(&g_io_tid[g_io_started], NULL, io_worker, (void *) (intptr_t) g_io_started) != 0) {
            break;
        }
        pthread_detach(g_io_tid[g_io_started]);
        g_io_started++;
    }
}

#if defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#define RIPPLE_HAVE_URING 1
#endif
#endif

#ifdef RIPPLE_HAVE_URING
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>

/* ---- io_uring (raw system calls; no liburing) ---- */

#define RIPPLE_URING_ENTRIES 64u

typedef struct {
    int        fd;
    unsigned * sq_head, * sq_tail, * sq_mask, * sq_array;
    unsigned * cq_head, * cq_tail, * cq_mask;
    struct io_uring_sqe * sqes;
    struct io_uring_cqe * cqes;
    void *     sq_ptr, * cq_ptr;
    size_t     sq_len, cq_len, sqes_len;
    uint8_t *  bounce; /* RIPPLE_URING_ENTRIES slots of RIPPLE_IO_BOUNCE bytes, aligned */
} ripple_uring;

static ripple_uring g_uring;
static int          g_uring_state; /* 0 not tried, 1 ready, -1 unavailable */
static char         g_uring_why[128];
static int          g_engine = RIPPLE_IO_ENGINE_AUTO; /* setting (enum ripple_io_engine) */
/* auto: batches whose mean request is below this go to io_uring (one thread keeps many small reads
 * in flight at less cost than waking threads), larger ones to the threads, which also copy the
 * O_DIRECT bounce buffers out in parallel (docs/BENCHMARKS.md, "I/O engines") */
#define RIPPLE_URING_AUTO_MAX_MEAN (64u << 10)

static int uring_setup(ripple_uring * r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    r->fd = (int) syscall(__NR_io_uring_setup, RIPPLE_URING_ENTRIES, &p);
    if (r->fd < 0) {
        snprintf(g_uring_why, sizeof(g_uring_why), "io_uring_setup: %s", strerror(errno));
        return -1;
    }
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->sq_len = r->cq_len = r->sq_len > r->cq_len ? r->sq_len : r->cq_len;
    }
    r->sq_ptr = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    r->cq_ptr = (p.features & IORING_FEAT_SINGLE_MMAP) ? r->sq_ptr
              : mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sq_ptr == MAP_FAILED || r->cq_ptr == MAP_FAILED || r->sqes == MAP_FAILED ||
        posix_memalign((void **) &r->bounce, RIPPLE_IO_ALIGN, (size_t) RIPPLE_URING_ENTRIES * RIPPLE_IO_BOUNCE) != 0) {
        snprintf(g_uring_why, sizeof(g_uring_why), "io_uring rings: %s", strerror(errno));
        close(r->fd);
        return -1;
    }
    uint8_t * sq = r->sq_ptr, * cq = r->cq_ptr;
    r->sq_head = (unsigned *) (sq + p.sq_off.head);
    r->sq_tail = (unsigned *) (sq + p.sq_off.tail);
    r->sq_mask = (unsigned *) (sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *) (sq + p.sq_off.array);
    r->cq_head = (unsigned *) (cq + p.cq_off.head);
    r->cq_tail = (unsigned *) (cq + p.cq_off.tail);
    r->cq_mask = (unsigned *) (cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *) (cq + p.cq_off.cqes);
    return 0;
}

/* One transfer in flight: a piece of a request (O_DIRECT pieces are at most one bounce slot). */
typedef struct {
    const ripple_io_req * req;
    uint64_t  off;      /* file offset of the transfer */
    size_t    len;      /* bytes asked */
    size_t    done;     /* bytes received so far (short reads are resubmitted) */
    size_t    head;     /* O_DIRECT: bytes before the payload in the aligned transfer */
    size_t    payload;  /* O_DIRECT: payload bytes of this piece */
    uint8_t * dst;      /* where the payload goes */
    int       slot;     /* O_DIRECT bounce slot, -1 for buffered reads straight into dst */
} uring_piece;

static void uring_push(ripple_uring * r, const uring_piece * pc, unsigned idx) {
    unsigned tail = *r->sq_tail;
    struct io_uring_sqe * sqe = &r->sqes[tail & *r->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_READ;
    sqe->fd = pc->req->fd;
    sqe->addr = (uint64_t) (uintptr_t) ((pc->slot >= 0 ? r->bounce + (size_t) pc->slot * RIPPLE_IO_BOUNCE : pc->dst) + pc->done);
    sqe->len = (unsigned) (pc->len - pc->done);
    sqe->off = pc->off + pc->done;
    sqe->user_data = idx;
    r->sq_array[tail & *r->sq_mask] = tail & *r->sq_mask;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* Split the batch into pieces, keep up to `depth` in flight, resubmit short reads. */
static int uring_run(ripple_uring * r, const ripple_io_req * reqs, int n, int depth, const char * path,
                     uint64_t * dev_bytes) {
    if (depth > (int) RIPPLE_URING_ENTRIES) {
        depth = RIPPLE_URING_ENTRIES;
    }
    /* pieces: buffered requests whole, O_DIRECT requests in aligned chunks of one bounce slot */
    size_t n_pieces = 0, cap = (size_t) n + 16;
    uring_piece * pcs = malloc(sizeof(uring_piece) * cap);
    if (!pcs) {
        ripple_set_error("out of memory");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const ripple_io_req * q = &reqs[i];
        uint64_t off = q->offset;
        size_t left = q->len;
        uint8_t * dst = q->dst;
        do {
            if (n_pieces == cap) {
                cap *= 2;
                uring_piece * np = realloc(pcs, sizeof(uring_piece) * cap);
                if (!np) {
                    free(pcs);
                    ripple_set_error("out of memory");
                    return -1;
                }
                pcs = np;
            }
            uring_piece * pc = &pcs[n_pieces++];
            memset(pc, 0, sizeof(*pc));
            pc->req = q;
            pc->slot = -1;
            if (q->direct) {
                const uint64_t a0 = off & ~(uint64_t) (RIPPLE_IO_ALIGN - 1);
                pc->head = (size_t) (off - a0);
                pc->payload = left < RIPPLE_IO_BOUNCE - pc->head ? left : RIPPLE_IO_BOUNCE - pc->head;
                pc->off = a0;
                pc->len = (pc->head + pc->payload + RIPPLE_IO_ALIGN - 1) & ~(size_t) (RIPPLE_IO_ALIGN - 1);
                pc->dst = dst;
                off += pc->payload;
                dst += pc->payload;
                left -= pc->payload;
            } else {
                pc->off = off;
                pc->len = left;
                pc->payload = left;
                pc->dst = dst;
                left = 0;
            }
        } while (left > 0);
    }
    int slots_free[RIPPLE_URING_ENTRIES], n_free = 0;
    for (int s = (int) RIPPLE_URING_ENTRIES - 1; s >= 0; s--) {
        slots_free[n_free++] = s;
    }
    size_t next = 0, finished = 0;
    int inflight = 0, rc = 0;
    uint64_t bytes = 0;
    while (finished < n_pieces) {
        unsigned to_submit = 0;
        while (rc == 0 && next < n_pieces && inflight < depth) {
            uring_piece * pc = &pcs[next];
            if (pc->req->direct) {
                pc->slot = slots_free[--n_free];
            }
            uring_push(r, pc, (unsigned) next);
            next++;
            inflight++;
            to_submit++;
        }
        if (inflight == 0) {
            break; /* an error stopped new submissions and everything in flight came back */
        }
        int e = (int) syscall(__NR_io_uring_enter, r->fd, to_submit, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (e < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            ripple_set_error("%s: io_uring_enter failed: %s", path, strerror(errno));
            rc = -1;
            break; /* the ring is left in an unknown state: the caller falls back */
        }
        unsigned head = *r->cq_head;
        const unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            const struct io_uring_cqe * cqe = &r->cqes[head & *r->cq_mask];
            uring_piece * pc = &pcs[cqe->user_data];
            const int res = cqe->res;
            inflight--;
            if (res == -EINTR || res == -EAGAIN) {
                uring_push(r, pc, (unsigned) cqe->user_data);
                inflight++;
                syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0);
                continue;
            }
            if (res < 0) {
                ripple_set_error("%s: read of %zu bytes at offset %llu failed: %s", path, pc->len - pc->done,
                                 (unsigned long long) (pc->off + pc->done), strerror(-res));
                rc = -1;
            } else if (res == 0 || (pc->slot >= 0 && (pc->done + (size_t) res) % RIPPLE_IO_ALIGN &&
                                    pc->done + (size_t) res < pc->head + pc->payload)) {
                ripple_set_error("%s: read of %zu bytes at offset %llu hit the end of the file "
                                 "(file truncated or modified after loading?)", path, pc->payload,
                                 (unsigned long long) (pc->off + pc->head));
                rc = -1;
            } else {
                pc->done += (size_t) res;
                bytes += (uint64_t) res;
                const size_t want = pc->slot >= 0 ? pc->head + pc->payload : pc->len;
                if (pc->done < want && (pc->slot < 0 || pc->done % RIPPLE_IO_ALIGN == 0)) {
                    uring_push(r, pc, (unsigned) cqe->user_data); /* short read: the rest */
                    inflight++;
                    syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0);
                    continue;
                }
            }
            if (pc->slot >= 0) {
                if (rc == 0) {
                    memcpy(pc->dst, r->bounce + (size_t) pc->slot * RIPPLE_IO_BOUNCE + pc->head, pc->payload);
                }
                slots_free[n_free++] = pc->slot;
            }
            finished++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        if (rc != 0 && inflight == 0) {
            break;
        }
    }
    free(pcs);
    *dev_bytes = bytes;
    return rc;
}

static ripple_uring * uring_get(void) {
    if (g_uring_state == 0) {
        g_uring_state = uring_setup(&g_uring) == 0 ? 1 : -1;
    }
    return g_uring_state == 1 ? &g_uring : NULL;
}
#endif /* RIPPLE_HAVE_URING */

int ripple_set_io_engine(int engine) {
    if (engine < RIPPLE_IO_ENGINE_THREADS || engine > RIPPLE_IO_ENGINE_AUTO) {
        return -1;
    }
#ifdef RIPPLE_HAVE_URING
    __atomic_store_n(&g_engine, engine, __ATOMIC_RELAXED);
    return 0;
#else
    return engine != RIPPLE_IO_ENGINE_THREADS ? -1 : 0;
#endif
}

/* The engine in force: the setting, or threads when io_uring is wanted but unavailable (the
 * reason in why). */
int ripple_get_io_engine(char * why, size_t why_len) {
    if (why && why_len) {
        why[0] = 0;
    }
#ifdef RIPPLE_HAVE_URING
    const int engine = __atomic_load_n(&g_engine, __ATOMIC_RELAXED);
    if (engine == RIPPLE_IO_ENGINE_THREADS) {
        return engine;
    }
    pthread_mutex_lock(&g_batch_mu);
    ripple_uring * r = uring_get();
    pthread_mutex_unlock(&g_batch_mu);
    if (!r && why && why_len) {
        snprintf(why, why_len, "%s", g_uring_why);
    }
    return r ? engine : RIPPLE_IO_ENGINE_THREADS;
#else
    if (why && why_len) {
        snprintf(why, why_len, "built without <linux/io_uring.h>");
    }
    return RIPPLE_IO_ENGINE_THREADS;
#endif
}

int ripple_io_run(const ripple_io_req * reqs, int n, const char * path, uint64_t * dev_bytes) {
    uint64_t bytes = 0;
    if (n <= 0) {
        *dev_bytes = 0;
        return 0;
    }
    int threads = __atomic_load_n(&g_io_threads, __ATOMIC_RELAXED);
#ifdef RIPPLE_HAVE_URING
    const int engine = __atomic_load_n(&g_engine, __ATOMIC_RELAXED);
    uint64_t total = 0;
    int in_place = 0; /* requests read straight into their destination go to the threads */
    for (int i = 0; i < n; i++) {
        total += reqs[i].len;
        in_place |= reqs[i].direct == 2;
    }
    if (n > 1 && !in_place && (engine == RIPPLE_IO_ENGINE_URING ||
                               (engine == RIPPLE_IO_ENGINE_AUTO && total / (uint64_t) n < RIPPLE_URING_AUTO_MAX_MEAN))) {
        pthread_mutex_lock(&g_batch_mu);
        ripple_uring * r = uring_get();
        int rc = 0;
        if (r) {
            rc = uring_run(r, reqs, n, threads, path, dev_bytes);
        }
        pthread_mutex_unlock(&g_batch_mu);
        if (r) {
            return rc;
        }
    }
#endif
    if (n == 1 || threads <= 1) {
        int rc = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            rc = run_one(&reqs[i], path, &bytes);
        }
        *dev_bytes = bytes;
        return rc;
    }
    pthread_mutex_lock(&g_batch_mu);
    pthread_mutex_lock(&g_io_mu);
    ensure_workers();
    g_io_reqs = reqs;
    g_io_n = n;
    g_io_next = 0;
    g_io_finished = 0;
    g_io_rc = 0;
    g_io_bytes = 0;
    g_io_path = path;
    g_io_gen++;
    pthread_cond_broadcast(&g_io_work);
    drain();
    while (g_io_finished < g_io_n) {
        pthread_cond_wait(&g_io_done, &g_io_mu);
    }
    int rc = g_io_rc;
    *dev_bytes = g_io_bytes;
    g_io_reqs = NULL;
    pthread_mutex_unlock(&g_io_mu);
    pthread_mutex_unlock(&g_batch_mu);
    return rc;
}

int ripple_set_io_threads(int n) {
    if (n < 1 || n > RIPPLE_MAX_IO_THREADS) {
        return -1;
    }
    pthread_mutex_lock(&g_io_mu);
    g_io_threads = n;
    pthread_mutex_unlock(&g_io_mu);
    return 0;
}

int ripple_get_io_threads(void) {
    return __atomic_load_n(&g_io_threads, __ATOMIC_RELAXED);
}

int ripple_open_direct(const char * path, dev_t dev, ino_t ino, char * why, size_t why_len) {
    int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, why_len, "%s", strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_dev != dev || st.st_ino != ino) {
        close(fd);
        snprintf(why, why_len, "the file was replaced after loading");
        return -1;
    }
    /* probe one aligned read: some file systems accept the flag and refuse the reads */
    uint8_t * probe = NULL;
    if (posix_memalign((void **) &probe, RIPPLE_IO_ALIGN, RIPPLE_IO_ALIGN) != 0) {
        close(fd);
        snprintf(why, why_len, "out of memory");
        return -1;
    }
    ssize_t r = pread(fd, probe, RIPPLE_IO_ALIGN, 0);
    int e = errno;
    free(probe);
    if (r < 0) {
        close(fd);
        snprintf(why, why_len, "%s", strerror(e));
        return -1;
    }
    return fd;
}
