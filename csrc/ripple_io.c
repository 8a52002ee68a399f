/* The I/O engine: a layer's read requests are issued together to a pool of reader threads (queue
 * depth = threads), optionally with O_DIRECT through aligned bounce buffers, and waited for as a
 * batch. A batch of one request is read by the caller itself. */
#define _GNU_SOURCE
#include "ripple_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RIPPLE_IO_ALIGN 4096u              /* O_DIRECT offset/length/buffer alignment (>= logical block) */
#define RIPPLE_IO_BOUNCE (1u << 20)        /* largest O_DIRECT transfer per pread */
#define RIPPLE_IO_MAX_THREADS 64

static pthread_mutex_t g_io_mu = PTHREAD_MUTEX_INITIALIZER;   /* pool state */
static pthread_mutex_t g_batch_mu = PTHREAD_MUTEX_INITIALIZER; /* one batch at a time */
static pthread_cond_t  g_io_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t  g_io_done = PTHREAD_COND_INITIALIZER;
static int             g_io_threads = 8; /* setting: queue depth */
static int             g_io_started;     /* workers running */
static pthread_t       g_io_tid[RIPPLE_IO_MAX_THREADS];
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
static int read_direct(int fd, uint8_t * dst, size_t len, uint64_t off, const char * path, uint64_t * dev_bytes) {
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

static int run_one(const ripple_io_req * r, const char * path, uint64_t * dev_bytes) {
    if (r->direct) {
        return read_direct(r->fd, r->dst, r->len, r->offset, path, dev_bytes);
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

int ripple_io_run(const ripple_io_req * reqs, int n, const char * path, uint64_t * dev_bytes) {
    uint64_t bytes = 0;
    if (n <= 0) {
        *dev_bytes = 0;
        return 0;
    }
    int threads = __atomic_load_n(&g_io_threads, __ATOMIC_RELAXED);
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
    if (n < 1 || n > RIPPLE_IO_MAX_THREADS) {
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
