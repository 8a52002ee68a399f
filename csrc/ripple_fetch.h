/* A layer's fetch (ripple_fetch.c): its needed bundles found in the cache or read from the file as
 * runs of consecutive positions, with access collapse and the cost model's union-or-stream choice. */
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "ripple_io.h"
#include "ripple_layer.h"
#include "ripple_model.h"

struct ripple_prefetch;

/* Where the needed bundles of a layer fetch are, and which were read from the file: those are offered
 * to the cache by ripple_fetch_admit once the layer's compute is done.
 * A fetch with overlap returns while its reads are in flight: a reader thread reads the requests in
 * up to RIPPLE_FETCH_PIECES pieces, one after the other, and the caller computes the bundles already
 * present (list[0, n_ready)) and then each piece's (list[piece_end[k-1], piece_end[k])) as soon as
 * ripple_fetch_piece(f, k) says it landed and passed its checksums. */
#define RIPPLE_FETCH_PIECES 4
typedef struct ripple_fetch {
    const uint8_t ** ptr;      /* per position: the bundle (cache slot or read buffer) */
    uint8_t *        admit;    /* per position: read by this fetch */
    int32_t *        read_len; /* per position: bundles in its request */
    int64_t          cap;
    ripple_model *   m;
    int              layer;
    const uint8_t *  dst;
    int              pending;
    /* overlap */
    int32_t *        list;      /* needed neurons: present first, then piece by piece */
    int64_t          n_ready;
    int              n_pieces;  /* 0: nothing in flight */
    int64_t          piece_end[RIPPLE_FETCH_PIECES];
    int64_t *        check;     /* positions read, to verify, piece by piece */
    int64_t          check_end[RIPPLE_FETCH_PIECES];
    ripple_io_req *  reqs;
    int              req_end[RIPPLE_FETCH_PIECES];
    int              verified;  /* pieces checked by the caller */
    int              rc;        /* first failure of a piece (read or checksum) */
    /* reader thread */
    pthread_t        tid;
    int              started, quit, queued;
    int              landed;    /* pieces read (or failed) */
    int              read_rc;
    uint64_t         bytes, io_ns;
    pthread_mutex_t  mu;
    pthread_cond_t   cv;
} ripple_fetch;
/* read the bundles at positions flagged in need (NULL = all), for a batch of n_tokens; access
 * collapse, and for batches of several tokens the cost model's union-or-stream choice; bundles in pf
 * (a prefetch of this layer, may be NULL) are taken from it. With f, cache hits stay in place
 * (f->ptr) and admission waits for ripple_fetch_admit; without f, hits are copied into dst. With f
 * and overlap, the reads may still be in flight on return (f->n_pieces > 0). */
int ripple_fetch_bundles(ripple_model * m, int layer, const uint8_t * need, int64_t n_tokens, uint8_t * dst,
                         const struct ripple_prefetch * pf, ripple_fetch * f, int overlap);
/* wait for piece k of an overlapped fetch, check it; 0 or -1 (error set) */
int ripple_fetch_piece(ripple_fetch * f, int k);
/* wait for every read of f still in flight (and check them); 0 or -1 */
int ripple_fetch_finish(ripple_fetch * f);
void ripple_fetch_admit(ripple_fetch * f);
void ripple_fetch_free(ripple_fetch * f);
/* the descriptor reads of m go through (*direct: it is the O_DIRECT one) */
int ripple_read_fd(ripple_model * m, int * direct);
/* Requests for the positions of a layer flagged in `missing`: runs of consecutive positions, runs
 * separated by at most `gap` positions merged (access collapse), read into dst at their position;
 * read_len[p] = bundles in p's request. Adds the bytes planned and those read in merged gaps. */
void ripple_fetch_requests(const ripple_layer * L, int fd, int direct, const uint8_t * missing, int64_t gap,
                           uint8_t * dst, ripple_io_req * reqs, int * n_req, int32_t * read_len, uint64_t * planned,
                           uint64_t * extra);
