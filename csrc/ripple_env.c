/* Settings from the RIPPLE_* environment variables (README, Settings): parsed and checked here
 * for every host. Python reads them through ripple_settings_from_env (and applies them with its
 * storage profile); a host without Python (llama-server, llama-bench through GGML_BACKEND_PATH)
 * gets them applied at registration by ripple_settings_apply. */
#include "ripple.h"
#include "ripple_cost.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define BOOL_RULE "True/False, 0/1 or one of \"1\", \"0\", \"true\", \"false\", \"yes\", \"no\", \"on\", \"off\""

/* the names of the values of each choice, in the order of their numbering (ripple.h) */
static const char * MODES[] = { "exact", "sparse", "auto", NULL };              /* enum ripple_mode */
static const char * POLICIES[] = { "lru", "s3fifo", "linking", "pinned", NULL }; /* enum ripple_cache_policy */
static const char * ENGINES[] = { "threads", "uring", "auto", NULL };            /* enum ripple_io_engine */
static const char * EXACT_DOWN[] = { "tensor", "bundles", NULL };                /* enum ripple_exact_down */
static const char * SPARSE_DOWN[] = { "bundles", "auto", NULL };                 /* enum ripple_sparse_down */

/* The variable's value with surrounding white space removed (into buf); NULL when unset or empty. */
static const char * value_of(const char * var, char * buf, size_t n) {
    const char * v = getenv(var);
    if (!v) {
        return NULL;
    }
    while (isspace((unsigned char) *v)) {
        v++;
    }
    snprintf(buf, n, "%s", v);
    size_t len = strlen(buf);
    while (len && isspace((unsigned char) buf[len - 1])) {
        buf[--len] = 0;
    }
    return len ? buf : NULL;
}

static int bad(char * err, size_t err_len, const char * var, const char * rule) {
    snprintf(err, err_len, "%s must be %s, got '%s'", var, rule, getenv(var));
    return -1;
}

static int choice(const char * var, const char ** names, int dflt, int * out, char * err, size_t err_len) {
    char buf[64];
    const char * v = value_of(var, buf, sizeof(buf));
    if (!v) {
        *out = dflt;
        return 0;
    }
    for (int i = 0; names[i]; i++) {
        if (!strcmp(v, names[i])) {
            *out = i;
            return 0;
        }
    }
    char rule[128] = "one of ";
    for (int i = 0; names[i]; i++) {
        snprintf(rule + strlen(rule), sizeof(rule) - strlen(rule), "%s%s", i ? ", " : "", names[i]);
    }
    return bad(err, err_len, var, rule);
}

static int boolean(const char * var, int dflt, int32_t * out, char * err, size_t err_len) {
    static const char * on[] = { "1", "true", "yes", "on" }, * off[] = { "0", "false", "no", "off" };
    char buf[64];
    const char * v = value_of(var, buf, sizeof(buf));
    if (!v) {
        *out = dflt;
        return 0;
    }
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(v, on[i]) || !strcasecmp(v, off[i])) {
            *out = !strcasecmp(v, on[i]);
            return 0;
        }
    }
    return bad(err, err_len, var, BOOL_RULE);
}

/* 1 parsed into *out, 0 unset, -1 not a number (message in err) */
static int number(const char * var, int whole, double * out, char * err, size_t err_len) {
    char buf[128];
    const char * v = value_of(var, buf, sizeof(buf));
    if (!v) {
        return 0;
    }
    char * end;
    errno = 0;
    if (whole) {
        long long x = strtoll(v, &end, 10);
        *out = (double) x;
        if (*end || errno) {
            return bad(err, err_len, var, "a whole number");
        }
    } else {
        *out = strtod(v, &end);
        if (*end || (errno && errno != ERANGE)) {
            return bad(err, err_len, var, "a number");
        }
    }
    return 1;
}

int ripple_settings_from_env(ripple_env_settings * s, char * err, size_t err_len) {
    ripple_env_settings r;
    double mb = 0, frac = 0, threads = RIPPLE_DEFAULT_IO_THREADS;
    int has_mb, has_frac, has_threads;
    /* the order of the Python runtime's checks: numbers parsed, then each variable in turn */
    if ((has_mb = number("RIPPLE_CACHE_MB", 0, &mb, err, err_len)) < 0 ||
        (has_frac = number("RIPPLE_CACHE_FRACTION", 0, &frac, err, err_len)) < 0 ||
        (has_threads = number("RIPPLE_IO_THREADS", 1, &threads, err, err_len)) < 0) {
        return -1;
    }
    int mode, policy, engine, exact_down, sparse_down;
    if (choice("RIPPLE_MODE", MODES, RIPPLE_MODE_AUTO, &mode, err, err_len)) {
        return -1;
    }
    char rule[64];
    if (has_mb && !(isfinite(mb) && mb >= 0 && mb <= RIPPLE_MAX_CACHE_MB)) {
        snprintf(rule, sizeof(rule), "a finite number of MiB in [0, %d]", RIPPLE_MAX_CACHE_MB);
        return bad(err, err_len, "RIPPLE_CACHE_MB", rule);
    }
    if (has_frac && !(isfinite(frac) && frac > 0 && frac <= 1)) {
        return bad(err, err_len, "RIPPLE_CACHE_FRACTION", "a finite number in (0, 1]");
    }
    if (choice("RIPPLE_CACHE_POLICY", POLICIES, RIPPLE_CACHE_PINNED, &policy, err, err_len) ||
        boolean("RIPPLE_COLLAPSE", 1, &r.collapse, err, err_len) ||
        boolean("RIPPLE_DIRECT_IO", 0, &r.direct_io, err, err_len)) {
        return -1;
    }
    if (has_threads && !(threads >= 1 && threads <= RIPPLE_MAX_IO_THREADS)) {
        snprintf(rule, sizeof(rule), "a whole number in [1, %d]", RIPPLE_MAX_IO_THREADS);
        return bad(err, err_len, "RIPPLE_IO_THREADS", rule);
    }
    if (choice("RIPPLE_IO_ENGINE", ENGINES, RIPPLE_IO_ENGINE_AUTO, &engine, err, err_len) ||
        boolean("RIPPLE_PREFETCH", 1, &r.prefetch, err, err_len) ||
        boolean("RIPPLE_OVERLAP", 1, &r.overlap, err, err_len) ||
        choice("RIPPLE_EXACT_DOWN", EXACT_DOWN, RIPPLE_EXACT_DOWN_TENSOR, &exact_down, err, err_len) ||
        choice("RIPPLE_SPARSE_DOWN", SPARSE_DOWN, RIPPLE_SPARSE_DOWN_AUTO, &sparse_down, err, err_len)) {
        return -1;
    }
    if (has_mb && has_frac) {
        snprintf(err, err_len, "give RIPPLE_CACHE_MB or RIPPLE_CACHE_FRACTION, not both");
        return -1;
    }
    if (boolean("RIPPLE_NO_LOAD_HOOK", 0, &r.no_load_hook, err, err_len) ||
        boolean("RIPPLE_VERIFY_READS", 1, &r.verify_reads, err, err_len)) {
        return -1;
    }
    r.mode = mode;
    r.cache_policy = policy;
    r.io_engine = engine;
    r.exact_down = exact_down;
    r.sparse_down = sparse_down;
    r.io_threads = (int32_t) threads;
    r.cache_fraction = has_frac ? frac : 0.0;
    r.cache_mb = has_frac ? -1.0 : has_mb ? mb : RIPPLE_DEFAULT_CACHE_MB;
    *s = r;
    return 0;
}

void ripple_settings_apply(const ripple_env_settings * s) {
    ripple_set_mode(s->mode);
    ripple_set_io_threads(s->io_threads);
    ripple_set_collapse_bytes(s->collapse ? ripple_cost_collapse_gap() : 0);
    ripple_set_direct_io(s->direct_io);
    ripple_set_prefetch(s->prefetch);
    ripple_set_overlap(s->overlap);
    ripple_set_sparse_down_rows(s->sparse_down);
    ripple_set_io_engine(s->io_engine);
    if (s->cache_fraction > 0) {
        ripple_set_cache_fraction(s->cache_fraction, s->cache_policy);
    } else {
        ripple_set_cache((int64_t) (s->cache_mb * 1024 * 1024), s->cache_policy);
    }
    ripple_set_exact_down(s->exact_down);
    ripple_set_verify_reads(s->verify_reads);
}
