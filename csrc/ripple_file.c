/* Reader of ripple-packed GGUF files (docs/FORMAT.md), through ggml's own gguf API: the one
 * reader of what the runtime needs from a file, used by every host (llama-server and the other
 * llama.cpp tools through the load-function hook, Python through ripple_load_begin).
 *
 * ripple_file_open parses the metadata and checks it against the tensor infos (every check of
 * docs/FORMAT.md section 5 "RippleFile.open"), ripple_file_check_quick does the load-time checks
 * (file size, region header and footer, sampled bundles, checksum table and header digests), and
 * ripple_file_load_blobs reads and checks the down scale tables and predictor blobs. Every error
 * names the file and the problem. */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_file.h"
#include "ripple_sha256.h"

#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FORMAT_VERSION 4     /* constants.FORMAT_VERSION: 4 adds sketch predictors */
#define FORMAT_VERSION_MIN 3 /* constants.READ_VERSIONS */
#define ALIGNMENT 4096
#define HEADER_SIZE ALIGNMENT
#define FOOTER_SIZE 64
#define SCAN_BYTES (64u << 20) /* GGUF headers (metadata, vocabularies, tensor infos) are smaller */

/* key names: ripple_gguf/format/constants.py (Keys) */
#define K_FORMAT_VERSION "ripple.format_version"
#define K_METADATA_SHA "ripple.metadata.sha256"
#define K_REGION_OFFSET "ripple.region.offset"
#define K_REGION_SIZE "ripple.region.size"
#define K_REGION_ID "ripple.region.id"
#define K_FILE_SIZE "ripple.file_size"
#define K_CK_OFFSET "ripple.checksum.offset"
#define K_CK_SIZE "ripple.checksum.size"
#define K_CK_BLOCK "ripple.checksum.block_size"
#define K_CK_SHA "ripple.checksum.sha256"
#define K_N_LAYERS "ripple.n_layers"
#define K_N_EMBD "ripple.n_embd"
#define K_INDEX "ripple.layer.index"
#define K_N_FF "ripple.layer.n_ff"
#define K_OFFSET "ripple.layer.offset"
#define K_BUNDLE_SIZE "ripple.layer.bundle_size"
#define K_GATE_TYPE "ripple.layer.gate_type"
#define K_UP_TYPE "ripple.layer.up_type"
#define K_DOWN_TYPE "ripple.layer.down_type"
#define K_DOWN_LAYOUT "ripple.layer.down_layout"
#define K_TABLE_OFFSET "ripple.layer.down_table_offset"
#define K_TABLE_SIZE "ripple.layer.down_table_size"
#define K_ORDER "ripple.placement.order"
#define K_FREQUENCY "ripple.placement.frequency"
#define K_QUALITY "ripple.placement.quality"
#define K_RULE "ripple.sparsity.rule"
#define K_ACTIVE_FRACTION "ripple.sparsity.active_fraction"
#define K_THRESHOLD "ripple.sparsity.threshold"
#define K_CAL_TEXT "ripple.calibration.text"
#define K_CAL_TOKENS "ripple.calibration.tokens"
#define K_CAL_SEED "ripple.calibration.seed"
#define K_RANK "ripple.predictor.rank"
#define K_RECALL_TARGET "ripple.predictor.recall_target"
#define K_PRED_OFFSET "ripple.predictor.offset"
#define K_PRED_SIZE "ripple.predictor.size"
#define K_METRICS "ripple.predictor.metrics"
#define K_DEFAULT_MODE "ripple.runtime.default_mode"
#define K_DEFAULT_MODE_REASON "ripple.runtime.default_mode_reason"

enum { ARR = GGUF_TYPE_ARRAY, NONE = -1 };
static const struct { const char * key; int type, sub; } KEY_TYPES[] = {
    { K_FORMAT_VERSION, GGUF_TYPE_UINT32, NONE }, { "ripple.tool_version", GGUF_TYPE_STRING, NONE },
    { "ripple.source.name", GGUF_TYPE_STRING, NONE }, { "ripple.source.sha256", GGUF_TYPE_STRING, NONE },
    { "ripple.source.size", GGUF_TYPE_UINT64, NONE },
    { K_REGION_OFFSET, GGUF_TYPE_UINT64, NONE }, { K_REGION_SIZE, GGUF_TYPE_UINT64, NONE },
    { "ripple.region.sha256", GGUF_TYPE_STRING, NONE }, { K_REGION_ID, GGUF_TYPE_STRING, NONE },
    { K_FILE_SIZE, GGUF_TYPE_UINT64, NONE }, { "ripple.alignment", GGUF_TYPE_UINT32, NONE },
    { K_CK_OFFSET, GGUF_TYPE_UINT64, NONE }, { K_CK_SIZE, GGUF_TYPE_UINT64, NONE },
    { K_CK_BLOCK, GGUF_TYPE_UINT32, NONE }, { K_CK_SHA, GGUF_TYPE_STRING, NONE },
    { K_METADATA_SHA, GGUF_TYPE_STRING, NONE },
    { K_N_LAYERS, GGUF_TYPE_UINT32, NONE }, { K_N_EMBD, GGUF_TYPE_UINT32, NONE },
    { K_INDEX, ARR, GGUF_TYPE_INT32 }, { K_N_FF, ARR, GGUF_TYPE_INT32 }, { K_GATE_TYPE, ARR, GGUF_TYPE_INT32 },
    { K_UP_TYPE, ARR, GGUF_TYPE_INT32 }, { K_DOWN_TYPE, ARR, GGUF_TYPE_INT32 }, { K_DOWN_LAYOUT, ARR, GGUF_TYPE_INT32 },
    { K_ORDER, ARR, GGUF_TYPE_INT32 },
    { K_OFFSET, ARR, GGUF_TYPE_UINT64 }, { K_BUNDLE_SIZE, ARR, GGUF_TYPE_UINT64 },
    { K_TABLE_OFFSET, ARR, GGUF_TYPE_UINT64 }, { K_TABLE_SIZE, ARR, GGUF_TYPE_UINT64 },
    { K_PRED_OFFSET, ARR, GGUF_TYPE_UINT64 }, { K_PRED_SIZE, ARR, GGUF_TYPE_UINT64 },
    { "ripple.placement.method", GGUF_TYPE_STRING, NONE }, { K_QUALITY, GGUF_TYPE_STRING, NONE },
    { K_RULE, GGUF_TYPE_STRING, NONE }, { K_ACTIVE_FRACTION, GGUF_TYPE_FLOAT32, NONE },
    { K_THRESHOLD, ARR, GGUF_TYPE_FLOAT32 },
    { K_CAL_TEXT, GGUF_TYPE_STRING, NONE }, { K_CAL_TOKENS, GGUF_TYPE_UINT32, NONE },
    { K_CAL_SEED, GGUF_TYPE_UINT32, NONE },
    { K_RANK, GGUF_TYPE_UINT32, NONE }, { K_RECALL_TARGET, GGUF_TYPE_FLOAT32, NONE },
    { K_METRICS, GGUF_TYPE_STRING, NONE }, { K_FREQUENCY, ARR, GGUF_TYPE_UINT8 },
    { K_DEFAULT_MODE, GGUF_TYPE_STRING, NONE }, { K_DEFAULT_MODE_REASON, GGUF_TYPE_STRING, NONE },
    { "ripple.predictor.kind", GGUF_TYPE_STRING, NONE }, { "ripple.predictor.sketch_outliers", GGUF_TYPE_UINT32, NONE },
    { "ripple.predictor.sketch_budget", GGUF_TYPE_FLOAT32, NONE },
};
/* written together or not at all: by a conversion with profiling, and with predictors */
static const char * PROFILE_KEYS[] = { K_QUALITY, K_RULE, K_ACTIVE_FRACTION, K_THRESHOLD, K_CAL_TEXT, K_CAL_TOKENS,
                                       K_CAL_SEED, NULL };
static const char * PREDICTOR_KEYS[] = { K_RANK, K_RECALL_TARGET, K_PRED_OFFSET, K_PRED_SIZE, K_METRICS, NULL };

static int fail(char * err, size_t err_len, const char * path, const char * fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(char * err, size_t err_len, const char * path, const char * fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(err, err_len, "%s: %s", path, msg);
    return -1;
}

static const char * type_text(int type, int sub, char * buf, size_t n) {
    static const char * names[] = { "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64",
                                    "i64", "f64" };
    const int t = type == ARR ? sub : type;
    const char * name = t >= 0 && t < (int) (sizeof(names) / sizeof(names[0])) ? names[t] : "unknown";
    snprintf(buf, n, "%s%s", name, type == ARR ? "[]" : "");
    return buf;
}

static int64_t key(const struct ripple_file * f, const char * k) {
    return gguf_find_key(f->g, k);
}

/* An integer key known to be of its type (checked by check_key_types) */
static uint64_t u64_of(const struct ripple_file * f, int64_t id) {
    return gguf_get_kv_type(f->g, id) == GGUF_TYPE_UINT32 ? gguf_get_val_u32(f->g, id) : gguf_get_val_u64(f->g, id);
}

static int need(struct ripple_file * f, const char * k, int64_t * id, char * err, size_t err_len) {
    *id = key(f, k);
    return *id < 0 ? fail(err, err_len, f->path, "missing metadata key %s", k) : 0;
}

static int check_key_types(struct ripple_file * f, char * err, size_t err_len) {
    char have[32], want[32];
    for (size_t i = 0; i < sizeof(KEY_TYPES) / sizeof(KEY_TYPES[0]); i++) {
        const int64_t id = key(f, KEY_TYPES[i].key);
        if (id < 0) {
            continue;
        }
        const int t = gguf_get_kv_type(f->g, id), sub = t == ARR ? (int) gguf_get_arr_type(f->g, id) : NONE;
        if (t != KEY_TYPES[i].type || sub != KEY_TYPES[i].sub) {
            return fail(err, err_len, f->path, "metadata key %s is %s, expected %s (damaged or edited file)",
                        KEY_TYPES[i].key, type_text(t, sub, have, sizeof(have)),
                        type_text(KEY_TYPES[i].type, KEY_TYPES[i].sub, want, sizeof(want)));
        }
    }
    const char ** groups[2] = { PROFILE_KEYS, PREDICTOR_KEYS };
    const char * what[2] = { "profiling", "predictor" };
    for (int gi = 0; gi < 2; gi++) {
        const char * present = NULL, * missing = NULL;
        for (const char ** k = groups[gi]; *k; k++) {
            if (key(f, *k) >= 0) {
                present = present ? present : *k;
            } else {
                missing = missing ? missing : *k;
            }
        }
        if (present && missing) {
            return fail(err, err_len, f->path, "missing metadata key %s (the file has other %s keys, e.g. %s: "
                        "damaged or edited file)", missing, what[gi], present);
        }
    }
    if (key(f, K_RANK) >= 0 && key(f, K_RULE) < 0) {
        return fail(err, err_len, f->path, "predictor keys without the profiling keys (no %s)", K_RULE);
    }
    const char * json_keys[] = { K_QUALITY, K_METRICS };
    for (int i = 0; i < 2; i++) {
        const int64_t id = key(f, json_keys[i]);
        if (id < 0) {
            continue;
        }
        /* the runtime reads nothing from these (inspect parses them): an object's braces */
        const char * s = gguf_get_val_str(f->g, id);
        size_t n = strlen(s);
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\n')) {
            n--;
        }
        while (*s == ' ' || *s == '\n') {
            s++, n--;
        }
        if (n < 2 || s[0] != '{' || s[n - 1] != '}') {
            return fail(err, err_len, f->path, "metadata key %s is not a JSON object (damaged or edited file)",
                        json_keys[i]);
        }
    }
    const int64_t kind = key(f, "ripple.predictor.kind");
    if (kind >= 0 && strcmp(gguf_get_val_str(f->g, kind), "lowrank") != 0 &&
        (strcmp(gguf_get_val_str(f->g, kind), "sketch") != 0 || f->version < 4)) {
        return fail(err, err_len, f->path, "metadata key ripple.predictor.kind is '%s', expected lowrank or sketch "
                    "(sketch from format version 4)", gguf_get_val_str(f->g, kind));
    }
    const char * frac_keys[] = { K_ACTIVE_FRACTION, K_RECALL_TARGET, "ripple.predictor.sketch_budget" };
    for (int i = 0; i < 3; i++) {
        const int64_t id = key(f, frac_keys[i]);
        if (id >= 0) {
            const float v = gguf_get_val_f32(f->g, id);
            if (!(v > 0.0f && v <= 1.0f)) {
                return fail(err, err_len, f->path, "metadata key %s is %g, expected a fraction in (0, 1]",
                            frac_keys[i], (double) v);
            }
        }
    }
    return 0;
}

/* The n_layers-entry array of key k (its element type checked already). */
static const void * layer_array(struct ripple_file * f, const char * k, char * err, size_t err_len) {
    int64_t id;
    if (need(f, k, &id, err, err_len) != 0) {
        return NULL;
    }
    if (gguf_get_arr_n(f->g, id) != (size_t) f->n_layers) {
        fail(err, err_len, f->path, "%s has %zu entries, expected %d", k, gguf_get_arr_n(f->g, id), f->n_layers);
        return NULL;
    }
    return gguf_get_arr_data(f->g, id);
}

static int64_t tensor_of(const struct ripple_file * f, int block, const char * kind) {
    char name[64];
    snprintf(name, sizeof(name), "blk.%d.ffn_%s.weight", block, kind);
    return gguf_find_tensor(f->g, name);
}

static int known_type(int t) {
    return t >= 0 && t < GGML_TYPE_COUNT && ggml_blck_size((enum ggml_type) t) > 0 && ggml_type_size((enum ggml_type) t) > 0;
}

static uint64_t ceil_div(uint64_t a, uint64_t b) {
    return (a + b - 1) / b;
}

/* u32 entries of a layer's part of the checksum table (docs/FORMAT.md section 2b) */
static uint64_t checksum_entries(const ripple_layer_desc * d, uint64_t block, uint64_t bytes[3]) {
    return (uint64_t) d->n_ff + ceil_div(bytes[0], block) + ceil_div(bytes[1], block) + ceil_div(bytes[2], block) + 2;
}

static void tensor_bytes(const ripple_layer_desc * d, uint64_t out[3]) {
    out[0] = d->gate_type >= 0 ? (uint64_t) d->n_ff * ggml_row_size((enum ggml_type) d->gate_type, d->n_embd) : 0;
    out[1] = (uint64_t) d->n_ff * ggml_row_size((enum ggml_type) d->up_type, d->n_embd);
    out[2] = (uint64_t) d->n_embd * ggml_row_size((enum ggml_type) d->down_src_type, d->n_ff);
}

static int is_sha_hex(const char * s) {
    if (strlen(s) != 64) {
        return 0;
    }
    for (const char * p = s; *p; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return 0;
        }
    }
    return 1;
}

/* A length-prefixed ripple.* key name in the first SCAN_BYTES of the file (u64 length, then
 * "ripple." and a lower-case letter or '_'), as the writer serializes it: evidence that a GGUF
 * whose header does not parse was meant to be ripple. -1 on a read error. */
static int mentions_ripple_key(int fd) {
    const size_t chunk = 1 << 20, keep = 16;
    uint8_t * buf = malloc(chunk + keep);
    if (!buf) {
        return -1;
    }
    size_t have = 0;
    uint64_t off = 0;
    int found = 0;
    while (!found && off < SCAN_BYTES) {
        ssize_t r = pread(fd, buf + have, chunk, (off_t) off);
        if (r < 0) {
            found = -1;
            break;
        }
        if (r == 0) {
            break;
        }
        off += (uint64_t) r;
        const size_t n = have + (size_t) r;
        for (size_t i = 0; i + 16 <= n && !found; i++) {
            if (buf[i] >= 8 && !memcmp(buf + i + 1, "\0\0\0\0\0\0\0ripple.", 14)) {
                const uint8_t c = buf[i + 15];
                found = (c >= 'a' && c <= 'z') || c == '_';
            }
        }
        have = n < keep ? n : keep;
        memmove(buf, buf + n - have, have);
    }
    free(buf);
    return found;
}

void ripple_file_free(struct ripple_file * f) {
    if (!f) {
        return;
    }
    if (f->g) {
        gguf_free(f->g);
    }
    if (f->fd >= 0) {
        close(f->fd);
    }
    if (f->blobs) {
        for (int l = 0; l < f->n_layers; l++) {
            free(f->blobs[l]);
        }
    }
    free(f->blobs);
    free(f->descs);
    free(f->crc);
    free(f->path);
    free(f);
}

static int parse_layers(struct ripple_file * f, uint64_t data_offset, uint64_t data_end, char * err, size_t err_len);

int ripple_file_open(const char * path, struct ripple_file ** out, char * err, size_t err_len) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0) {
        return fail(err, err_len, path, "cannot read: %s", strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        return fail(err, err_len, path, "cannot read: %s", S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
    }
    struct ripple_file * f = calloc(1, sizeof(*f));
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return fail(err, err_len, path, "out of memory");
    }
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        fail(err, err_len, path, "cannot read: %s", strerror(errno));
        ripple_file_free(f);
        return -1;
    }
    if (fstat(f->fd, &st) != 0) {
        fail(err, err_len, path, "cannot read: %s", strerror(errno));
        ripple_file_free(f);
        return -1;
    }
    /* the checks read a few scattered pieces: no read-ahead around them */
    posix_fadvise(f->fd, 0, 0, POSIX_FADV_RANDOM);
    struct gguf_init_params gp = { /* .no_alloc = */ true, /* .ctx = */ NULL };
    f->g = gguf_init_from_file(path, gp);
    if (!f->g) {
        const int ripple = mentions_ripple_key(f->fd);
        ripple_file_free(f);
        if (ripple < 0) {
            return fail(err, err_len, path, "cannot read: %s", strerror(errno));
        }
        /* not ripple: stock llama.cpp reports on it */
        return ripple ? fail(err, err_len, path, "truncated or corrupt GGUF header (ggml's gguf reader refuses it) "
                             "in a file that names ripple.* keys") : 0;
    }
    int any = 0;
    char names[160] = "";
    for (int64_t i = 0; i < gguf_get_n_kv(f->g); i++) {
        const char * k = gguf_get_key(f->g, i);
        if (!strncmp(k, "ripple.", 7)) {
            if (any < 3) {
                snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s", any ? ", " : "", k);
            } else if (any == 3) {
                snprintf(names + strlen(names), sizeof(names) - strlen(names), ", ...");
            }
            any++;
        }
    }
    if (!any) {
        ripple_file_free(f);
        return 0;
    }
    *out = f;
    const int64_t ver = key(f, K_FORMAT_VERSION);
    if (ver < 0) {
        return fail(err, err_len, path, "not a ripple-packed GGUF (has %s but no %s key)", names, K_FORMAT_VERSION);
    }
    if (gguf_get_kv_type(f->g, ver) != GGUF_TYPE_UINT32 || gguf_get_val_u32(f->g, ver) < FORMAT_VERSION_MIN ||
        gguf_get_val_u32(f->g, ver) > FORMAT_VERSION) {
        char v[32] = "?";
        if (gguf_get_kv_type(f->g, ver) == GGUF_TYPE_UINT32) {
            snprintf(v, sizeof(v), "%u", gguf_get_val_u32(f->g, ver));
        }
        return fail(err, err_len, path, "ripple format version %s is not supported (this tool reads %d and %d): "
                    "convert the source again", v, FORMAT_VERSION_MIN, FORMAT_VERSION);
    }
    f->version = gguf_get_val_u32(f->g, ver);
    if (check_key_types(f, err, err_len) != 0) {
        return -1;
    }
    const uint64_t data_offset = gguf_get_data_offset(f->g);
    uint64_t data_end = data_offset;
    for (int64_t t = 0; t < gguf_get_n_tensors(f->g); t++) {
        const uint64_t e = data_offset + gguf_get_tensor_offset(f->g, t) + gguf_get_tensor_size(f->g, t);
        data_end = e > data_end ? e : data_end;
    }
    if (data_end > (uint64_t) st.st_size) {
        return fail(err, err_len, path, "truncated: tensor data ends at %llu, file has %llu bytes",
                    (unsigned long long) data_end, (unsigned long long) st.st_size);
    }
    return parse_layers(f, data_offset, data_end, err, err_len) == 0 ? 1 : -1;
}

static int parse_layers(struct ripple_file * f, uint64_t data_offset, uint64_t data_end, char * err, size_t err_len) {
    const char * p = f->path;
    int64_t id_nl, id_ne, id_order, id_ro, id_rs, id_fs;
    if (need(f, K_N_LAYERS, &id_nl, err, err_len) || need(f, K_N_EMBD, &id_ne, err, err_len)) {
        return -1;
    }
    f->n_layers = (int32_t) gguf_get_val_u32(f->g, id_nl);
    const int32_t n_embd = (int32_t) gguf_get_val_u32(f->g, id_ne);
    if (f->n_layers <= 0 || f->n_layers > 65536 || n_embd <= 0) {
        return fail(err, err_len, p, "%s = %d and %s = %d: no FFN layers", K_N_LAYERS, f->n_layers, K_N_EMBD, n_embd);
    }
    const int32_t * index = layer_array(f, K_INDEX, err, err_len);
    const int32_t * n_ff = index ? layer_array(f, K_N_FF, err, err_len) : NULL;
    const uint64_t * offset = n_ff ? layer_array(f, K_OFFSET, err, err_len) : NULL;
    const uint64_t * bsize = offset ? layer_array(f, K_BUNDLE_SIZE, err, err_len) : NULL;
    const int32_t * gate_t = bsize ? layer_array(f, K_GATE_TYPE, err, err_len) : NULL;
    const int32_t * up_t = gate_t ? layer_array(f, K_UP_TYPE, err, err_len) : NULL;
    const int32_t * down_t = up_t ? layer_array(f, K_DOWN_TYPE, err, err_len) : NULL;
    const int32_t * layout = down_t ? layer_array(f, K_DOWN_LAYOUT, err, err_len) : NULL;
    const uint64_t * t_off = layout ? layer_array(f, K_TABLE_OFFSET, err, err_len) : NULL;
    const uint64_t * t_size = t_off ? layer_array(f, K_TABLE_SIZE, err, err_len) : NULL;
    if (!t_size || need(f, K_ORDER, &id_order, err, err_len)) {
        return -1;
    }
    uint64_t total_ff = 0;
    for (int l = 0; l < f->n_layers; l++) {
        if (n_ff[l] <= 0) {
            return fail(err, err_len, p, "layer %d: %s is %d", index[l], K_N_FF, n_ff[l]);
        }
        total_ff += (uint64_t) n_ff[l];
    }
    if (gguf_get_arr_n(f->g, id_order) != total_ff) {
        return fail(err, err_len, p, "%s has %zu entries, expected %llu", K_ORDER, gguf_get_arr_n(f->g, id_order),
                    (unsigned long long) total_ff);
    }
    const int32_t * order = gguf_get_arr_data(f->g, id_order);
    const int64_t id_freq = key(f, K_FREQUENCY);
    const uint8_t * freq = NULL;
    if (id_freq >= 0) {
        if (gguf_get_arr_n(f->g, id_freq) != total_ff) {
            return fail(err, err_len, p, "%s has %zu entries, expected %llu", K_FREQUENCY,
                        gguf_get_arr_n(f->g, id_freq), (unsigned long long) total_ff);
        }
        freq = gguf_get_arr_data(f->g, id_freq);
    }
    int64_t id_rid;
    if (need(f, K_REGION_OFFSET, &id_ro, err, err_len) || need(f, K_REGION_SIZE, &id_rs, err, err_len) ||
        need(f, K_FILE_SIZE, &id_fs, err, err_len) || need(f, K_REGION_ID, &id_rid, err, err_len)) {
        return -1;
    }
    f->region_offset = u64_of(f, id_ro);
    f->region_size = u64_of(f, id_rs);
    f->file_size = u64_of(f, id_fs);
    const uint64_t ro = f->region_offset, rs = f->region_size;
    if (ro < data_end || ro % ALIGNMENT) {
        return fail(err, err_len, p, "region offset %llu overlaps the tensor data or is unaligned", (unsigned long long) ro);
    }
    if (rs < HEADER_SIZE + FOOTER_SIZE || ro + rs < ro) {
        return fail(err, err_len, p, "region size %llu is too small", (unsigned long long) rs);
    }
    f->descs = calloc((size_t) f->n_layers, sizeof(ripple_layer_desc));
    f->blobs = calloc((size_t) f->n_layers * 2, sizeof(uint8_t *));
    if (!f->descs || !f->blobs) {
        return fail(err, err_len, p, "out of memory");
    }
    f->order = (int32_t *) order;
    uint64_t start = 0;
    for (int l = 0; l < f->n_layers; l++) {
        ripple_layer_desc * d = &f->descs[l];
        const int blk = index[l];
        const int64_t tg = tensor_of(f, blk, "gate"), tu = tensor_of(f, blk, "up"), td = tensor_of(f, blk, "down");
        if (tu < 0 || td < 0) {
            return fail(err, err_len, p, "layer %d: standard FFN tensors missing", blk);
        }
        if ((tg < 0) != (gate_t[l] == -1) || (tg >= 0 && (int) gguf_get_tensor_type(f->g, tg) != gate_t[l]) ||
            (int) gguf_get_tensor_type(f->g, tu) != up_t[l]) {
            return fail(err, err_len, p, "layer %d: ripple gate/up types disagree with the tensors", blk);
        }
        const int32_t * lorder = order + start;
        start += (uint64_t) n_ff[l];
        uint8_t * seen = calloc((size_t) n_ff[l], 1);
        if (!seen) {
            return fail(err, err_len, p, "out of memory");
        }
        int perm = 1;
        for (int32_t i = 0; i < n_ff[l] && perm; i++) {
            perm = lorder[i] >= 0 && lorder[i] < n_ff[l] && !seen[lorder[i]];
            if (perm) {
                seen[lorder[i]] = 1;
            }
        }
        free(seen);
        if (!perm) {
            return fail(err, err_len, p, "layer %d: placement order is not a permutation of %d", blk, n_ff[l]);
        }
        d->block = blk;
        d->n_ff = n_ff[l];
        d->n_embd = n_embd;
        d->gate_type = gate_t[l];
        d->up_type = up_t[l];
        d->down_type = down_t[l];
        d->down_src_type = (int32_t) gguf_get_tensor_type(f->g, td);
        d->order = lorder;
        d->bundles_offset = ro + offset[l];
        d->gate_offset = tg >= 0 ? data_offset + gguf_get_tensor_offset(f->g, tg) : 0;
        d->up_offset = data_offset + gguf_get_tensor_offset(f->g, tu);
        d->down_offset = data_offset + gguf_get_tensor_offset(f->g, td);
        d->frequency = freq ? freq + (start - (uint64_t) n_ff[l]) : NULL;
        d->act_rule = RIPPLE_RULE_NONE;
        if (layout[l] != 0 && layout[l] != 1) {
            return fail(err, err_len, p, "layer %d: unknown down layout %d", blk, layout[l]);
        }
        d->down_layout = layout[l];
        if (!known_type(d->up_type) || !known_type(d->down_type) || !known_type(d->down_src_type) ||
            (d->gate_type != -1 && !known_type(d->gate_type))) {
            return fail(err, err_len, p, "layer %d: bad bundle types", blk);
        }
        int32_t bits = 0, group = 0;
        if (d->down_layout == 1 && (d->down_type != d->down_src_type ||
                                    !ripple_split_info(d->down_type, &bits, NULL, &group, NULL) ||
                                    d->n_ff % group || n_embd % 8)) {
            return fail(err, err_len, p, "layer %d: split down columns of type %s from ffn_down of type %s", blk,
                        ggml_type_name((enum ggml_type) d->down_type), ggml_type_name((enum ggml_type) d->down_src_type));
        }
        const int64_t * ne_u = gguf_get_tensor_ne(f->g, tu), * ne_d = gguf_get_tensor_ne(f->g, td);
        const int64_t * ne_g = tg >= 0 ? gguf_get_tensor_ne(f->g, tg) : ne_u;
        if (ne_u[0] != n_embd || ne_u[1] != d->n_ff || ne_u[2] != 1 || ne_u[3] != 1 || ne_d[0] != d->n_ff ||
            ne_d[1] != n_embd || ne_d[2] != 1 || ne_d[3] != 1 || ne_g[0] != n_embd || ne_g[1] != d->n_ff ||
            ne_g[2] != 1 || ne_g[3] != 1) {
            return fail(err, err_len, p, "layer %d: FFN tensor shapes disagree with n_ff=%d, n_embd=%d", blk, d->n_ff, n_embd);
        }
        if ((d->gate_type >= 0 && n_embd % ggml_blck_size((enum ggml_type) d->gate_type)) ||
            n_embd % ggml_blck_size((enum ggml_type) d->up_type) ||
            (d->down_layout == 0 && n_embd % ggml_blck_size((enum ggml_type) d->down_type))) {
            return fail(err, err_len, p, "layer %d: bad bundle types", blk);
        }
        const uint64_t down_row = d->down_layout == 1 ? (uint64_t) bits * (uint64_t) n_embd / 8
                                                      : ggml_row_size((enum ggml_type) d->down_type, n_embd);
        const uint64_t bs = (d->gate_type >= 0 ? ggml_row_size((enum ggml_type) d->gate_type, n_embd) : 0) +
                            ggml_row_size((enum ggml_type) d->up_type, n_embd) + down_row;
        if (bs != bsize[l]) {
            return fail(err, err_len, p, "layer %d: bundle size %llu != %llu", blk, (unsigned long long) bsize[l],
                        (unsigned long long) bs);
        }
        d->bundle_size = bs;
        if (offset[l] % ALIGNMENT || offset[l] > rs ||
            d->bundles_offset + (uint64_t) d->n_ff * bs > ro + rs - FOOTER_SIZE) {
            return fail(err, err_len, p, "layer %d: bundle block outside the region", blk);
        }
        const uint64_t want_tab = d->down_layout == 1 ? (uint64_t) d->n_ff / (uint64_t) group * (uint64_t) n_embd * 8 : 0;
        if (t_size[l] != want_tab || (want_tab && (t_off[l] % 64 || t_off[l] < HEADER_SIZE || t_off[l] > rs ||
                                                  t_off[l] + want_tab > rs - FOOTER_SIZE))) {
            return fail(err, err_len, p, "layer %d: down scale table (%llu bytes at %llu) does not fit the layout "
                        "(expected %llu bytes inside the region)", blk, (unsigned long long) t_size[l],
                        (unsigned long long) t_off[l], (unsigned long long) want_tab);
        }
        d->down_table_size = want_tab;
        d->down_table_file_offset = want_tab ? ro + t_off[l] : 0;
        f->expected_tensors += d->gate_type >= 0 ? 3 : 2;
    }
    /* the offline stage's keys: activity rule and thresholds, predictor blobs, default mode */
    const int64_t id_rule = key(f, K_RULE);
    if (id_rule >= 0) {
        const char * rule = gguf_get_val_str(f->g, id_rule);
        const int r = !strcmp(rule, "nonzero") ? RIPPLE_RULE_NONZERO : !strcmp(rule, "magnitude") ? RIPPLE_RULE_MAGNITUDE
                                                                                            : RIPPLE_RULE_NONE;
        if (r == RIPPLE_RULE_NONE) {
            return fail(err, err_len, p, "unknown sparsity rule '%s'", rule);
        }
        const int64_t id_thr = key(f, K_THRESHOLD);
        const float * thr = gguf_get_arr_data(f->g, id_thr);
        int ok = gguf_get_arr_n(f->g, id_thr) == (size_t) f->n_layers;
        for (int l = 0; ok && l < f->n_layers; l++) {
            ok = isfinite(thr[l]) && thr[l] >= 0;
        }
        if (!ok) {
            return fail(err, err_len, p, "%s must hold %d finite non-negative values", K_THRESHOLD, f->n_layers);
        }
        for (int l = 0; l < f->n_layers; l++) {
            f->descs[l].act_rule = r;
            f->descs[l].act_threshold = thr[l];
        }
    }
    int has_pred = 0;
    if (key(f, K_PRED_OFFSET) >= 0) {
        const int64_t io = key(f, K_PRED_OFFSET), is = key(f, K_PRED_SIZE);
        if (gguf_get_arr_n(f->g, io) != (size_t) f->n_layers || gguf_get_arr_n(f->g, is) != (size_t) f->n_layers) {
            return fail(err, err_len, p, "%s/%s must hold %d entries", K_PRED_OFFSET, K_PRED_SIZE, f->n_layers);
        }
        const uint64_t * po = gguf_get_arr_data(f->g, io), * ps = gguf_get_arr_data(f->g, is);
        for (int l = 0; l < f->n_layers; l++) {
            if (ps[l] == 0 || po[l] % 64 || po[l] < HEADER_SIZE || po[l] > rs || ps[l] > rs ||
                po[l] + ps[l] > rs - FOOTER_SIZE) {
                return fail(err, err_len, p, "layer %d: predictor blob outside the region", f->descs[l].block);
            }
            f->descs[l].predictor_file_offset = ro + po[l];
            f->descs[l].predictor_size = ps[l];
        }
        has_pred = 1;
    }
    const int64_t id_mode = key(f, K_DEFAULT_MODE);
    if (id_mode >= 0) {
        const char * mode = gguf_get_val_str(f->g, id_mode);
        if (strcmp(mode, "exact") && strcmp(mode, "sparse")) {
            return fail(err, err_len, p, "%s is '%s', expected one of exact, sparse", K_DEFAULT_MODE, mode);
        }
        f->default_mode = !strcmp(mode, "sparse") ? RIPPLE_MODE_SPARSE : RIPPLE_MODE_EXACT;
    } else {
        f->default_mode = has_pred ? RIPPLE_MODE_SPARSE : RIPPLE_MODE_EXACT;
    }
    const int64_t id_reason = key(f, K_DEFAULT_MODE_REASON);
    snprintf(f->default_mode_reason, sizeof(f->default_mode_reason), "%s",
             id_reason >= 0 ? gguf_get_val_str(f->g, id_reason) :
             has_pred ? "the file has predictors" : "the file has no predictors");
    /* the checksum table */
    int64_t id_co, id_cs, id_cb, id_sha, id_msha;
    if (need(f, K_CK_OFFSET, &id_co, err, err_len) || need(f, K_CK_SIZE, &id_cs, err, err_len) ||
        need(f, K_CK_BLOCK, &id_cb, err, err_len) || need(f, K_CK_SHA, &id_sha, err, err_len) ||
        need(f, K_METADATA_SHA, &id_msha, err, err_len)) {
        return -1;
    }
    if (!is_sha_hex(gguf_get_val_str(f->g, id_sha)) || !is_sha_hex(gguf_get_val_str(f->g, id_msha))) {
        return fail(err, err_len, p, "%s is not a sha256 hex digest",
                    is_sha_hex(gguf_get_val_str(f->g, id_sha)) ? K_METADATA_SHA : K_CK_SHA);
    }
    const uint64_t ck_off = u64_of(f, id_co), ck_size = u64_of(f, id_cs), ck_block = u64_of(f, id_cb);
    uint64_t entries = 0;
    for (int l = 0; l < f->n_layers && ck_block; l++) {
        uint64_t bytes[3];
        tensor_bytes(&f->descs[l], bytes);
        entries += checksum_entries(&f->descs[l], ck_block, bytes);
    }
    if (ck_block == 0 || ck_size != 4 * entries || ck_off % 64 || ck_off < HEADER_SIZE || ck_off > rs ||
        ck_off + ck_size > rs - FOOTER_SIZE) {
        return fail(err, err_len, p, "checksum table (%llu bytes at %llu, blocks of %llu) does not fit the layout",
                    (unsigned long long) ck_size, (unsigned long long) ck_off, (unsigned long long) ck_block);
    }
    f->ck_offset = ro + ck_off;
    f->ck_size = ck_size;
    f->ck_block = ck_block;
    for (int l = 0; l < f->n_layers; l++) {
        f->descs[l].crc_block = ck_block;
    }
    return 0;
}

static int pread_exact(struct ripple_file * f, void * dst, size_t n, uint64_t off, char * err, size_t err_len) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(f->fd, (uint8_t *) dst + got, n - got, (off_t) (off + got));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return fail(err, err_len, f->path, "read of %zu bytes at offset %llu failed: %s", n,
                        (unsigned long long) off, strerror(errno));
        }
        if (r == 0) {
            return fail(err, err_len, f->path, "truncated: wanted %zu bytes at offset %llu, got %zu", n,
                        (unsigned long long) off, got);
        }
        got += (size_t) r;
    }
    return 0;
}

static uint64_t le64(const uint8_t * b) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = v << 8 | b[i];
    }
    return v;
}

static int check_frame(struct ripple_file * f, char * err, size_t err_len) {
    const char * p = f->path;
    struct stat st;
    if (fstat(f->fd, &st) != 0) {
        return fail(err, err_len, p, "cannot read: %s", strerror(errno));
    }
    if ((uint64_t) st.st_size != f->file_size) {
        return fail(err, err_len, p, "file size %llu != %llu recorded at conversion (truncated or modified)",
                    (unsigned long long) st.st_size, (unsigned long long) f->file_size);
    }
    if (f->region_offset + f->region_size != f->file_size) {
        return fail(err, err_len, p, "region does not end at the end of the file");
    }
    uint8_t h[56], ft[48];
    if (pread_exact(f, h, sizeof(h), f->region_offset, err, err_len) ||
        pread_exact(f, ft, sizeof(ft), f->file_size - FOOTER_SIZE, err, err_len)) {
        return -1;
    }
    if (memcmp(h, "RIPPLE01", 8) != 0) {
        return fail(err, err_len, p, "no ripple region header at offset %llu", (unsigned long long) f->region_offset);
    }
    char id[65];
    for (int i = 0; i < 32; i++) {
        snprintf(id + 2 * i, 3, "%02x", h[24 + i]);
    }
    uint32_t version, n_layers;
    memcpy(&version, h + 8, 4);
    memcpy(&n_layers, h + 12, 4);
    const char * want_id = gguf_get_val_str(f->g, key(f, K_REGION_ID));
    if (version != f->version || n_layers != (uint32_t) f->n_layers || le64(h + 16) != f->region_size ||
        strcmp(id, want_id) != 0) {
        return fail(err, err_len, p, "region header does not match the metadata (region from another file?)");
    }
    for (int i = 0; i < 32; i++) {
        snprintf(id + 2 * i, 3, "%02x", ft[16 + i]);
    }
    if (memcmp(ft, "RPLEND01", 8) != 0 || le64(ft + 8) != f->region_size || strcmp(id, want_id) != 0) {
        return fail(err, err_len, p, "region footer does not match the metadata");
    }
    return 0;
}

/* the gate/up bytes of the bundles at positions 0, n_ff/2, n_ff-1 against the standard tensors' rows */
static int check_bundle_rows(struct ripple_file * f, const ripple_layer_desc * d, char * err, size_t err_len) {
    const size_t gr = d->gate_type >= 0 ? ggml_row_size((enum ggml_type) d->gate_type, d->n_embd) : 0;
    const size_t ur = ggml_row_size((enum ggml_type) d->up_type, d->n_embd);
    uint8_t * b = malloc(2 * (gr + ur));
    if (!b) {
        return fail(err, err_len, f->path, "out of memory");
    }
    const int32_t pos[3] = { 0, d->n_ff / 2, d->n_ff - 1 };
    int rc = 0;
    for (int i = 0; i < 3 && rc == 0; i++) {
        const int32_t nid = d->order[pos[i]];
        uint8_t * std = b + gr + ur;
        rc = pread_exact(f, b, gr + ur, d->bundles_offset + (uint64_t) pos[i] * d->bundle_size, err, err_len);
        if (rc == 0 && gr) {
            rc = pread_exact(f, std, gr, d->gate_offset + (uint64_t) nid * gr, err, err_len);
            if (rc == 0 && memcmp(b, std, gr) != 0) {
                rc = fail(err, err_len, f->path, "layer %d: bundle at position %d (neuron %d) gate row differs from "
                          "ffn_gate", d->block, pos[i], nid);
            }
        }
        if (rc == 0) {
            rc = pread_exact(f, std, ur, d->up_offset + (uint64_t) nid * ur, err, err_len);
            if (rc == 0 && memcmp(b + gr, std, ur) != 0) {
                rc = fail(err, err_len, f->path, "layer %d: bundle at position %d (neuron %d) up row differs from "
                          "ffn_up", d->block, pos[i], nid);
            }
        }
    }
    free(b);
    return rc;
}

static int check_checksum_table(struct ripple_file * f, char * err, size_t err_len) {
    f->crc = malloc((size_t) f->ck_size);
    if (!f->crc) {
        return fail(err, err_len, f->path, "out of memory");
    }
    if (pread_exact(f, f->crc, (size_t) f->ck_size, f->ck_offset, err, err_len) != 0) {
        return -1;
    }
    ripple_sha256 s;
    char hex[65];
    ripple_sha256_init(&s);
    ripple_sha256_update(&s, f->crc, (size_t) f->ck_size);
    ripple_sha256_hex(&s, hex);
    if (strcmp(hex, gguf_get_val_str(f->g, key(f, K_CK_SHA))) != 0) {
        return fail(err, err_len, f->path, "checksum table does not match %s (file damaged or modified after "
                    "conversion)", K_CK_SHA);
    }
    const uint32_t * c = f->crc;
    for (int l = 0; l < f->n_layers; l++) {
        ripple_layer_desc * d = &f->descs[l];
        uint64_t bytes[3];
        tensor_bytes(d, bytes);
        const uint64_t n = checksum_entries(d, f->ck_block, bytes);
        d->bundle_crc = c;
        d->tensor_crc = c + d->n_ff;
        d->tensor_crc_count = n - 2 - (uint64_t) d->n_ff;
        d->down_table_crc = c[n - 2];
        d->predictor_crc = c[n - 1];
        c += n;
    }
    return 0;
}

/* sha256("ripple-gguf metadata\0" | the header up to the end of the tensor infos, without the
 * ripple.metadata.sha256 record) against that record's value (docs/FORMAT.md section 1) */
static int check_metadata(struct ripple_file * f, char * err, size_t err_len) {
    const char * want = gguf_get_val_str(f->g, key(f, K_METADATA_SHA));
    const size_t n = gguf_get_data_offset(f->g);
    uint8_t * raw = malloc(n);
    if (!raw) {
        return fail(err, err_len, f->path, "out of memory");
    }
    int rc = pread_exact(f, raw, n, 0, err, err_len);
    /* the record: u64 key length, key, u32 type (string), u64 value length, value */
    const size_t klen = strlen(K_METADATA_SHA), rlen = 8 + klen + 4 + 8 + 64;
    uint8_t rec[8 + sizeof(K_METADATA_SHA) + 4 + 8 + 64];
    const uint64_t kl = klen, vl = 64;
    const uint32_t vt = GGUF_TYPE_STRING;
    memcpy(rec, &kl, 8);
    memcpy(rec + 8, K_METADATA_SHA, klen);
    memcpy(rec + 8 + klen, &vt, 4);
    memcpy(rec + 12 + klen, &vl, 8);
    memcpy(rec + 20 + klen, want, 64);
    const uint8_t * at = rc == 0 ? memmem(raw, n, rec, rlen) : NULL;
    if (rc == 0 && !at) {
        rc = fail(err, err_len, f->path, "GGUF header: no %s record where the key/value records end", K_METADATA_SHA);
    }
    size_t end = at ? (size_t) (at - raw) + rlen : 0; /* the last record: the tensor infos follow */
    for (int64_t t = 0; rc == 0 && t < gguf_get_n_tensors(f->g); t++) {
        uint64_t len;
        uint32_t nd;
        if (end + 8 > n || (memcpy(&len, raw + end, 8), len > n - end - 8) || end + 8 + len + 4 > n ||
            (memcpy(&nd, raw + end + 8 + len, 4), nd > 4) || end + 8 + len + 4 + 8 * (size_t) nd + 12 > n) {
            rc = fail(err, err_len, f->path, "GGUF header (metadata or tensor infos) does not match %s: modified "
                      "after conversion", K_METADATA_SHA);
            break;
        }
        end += 8 + len + 4 + 8 * (size_t) nd + 12;
    }
    if (rc == 0) {
        ripple_sha256 s;
        char hex[65];
        ripple_sha256_init(&s);
        ripple_sha256_update(&s, "ripple-gguf metadata", sizeof("ripple-gguf metadata")); /* with its \0 */
        ripple_sha256_update(&s, raw, (size_t) (at - raw));
        ripple_sha256_update(&s, at + rlen, end - (size_t) (at - raw) - rlen);
        ripple_sha256_hex(&s, hex);
        if (strcmp(hex, want) != 0) {
            rc = fail(err, err_len, f->path, "GGUF header (metadata or tensor infos) does not match %s: modified "
                      "after conversion", K_METADATA_SHA);
        }
    }
    free(raw);
    return rc;
}

int ripple_file_check_quick(struct ripple_file * f, char * err, size_t err_len) {
    if (check_frame(f, err, err_len) != 0) {
        return -1;
    }
    for (int l = 0; l < f->n_layers; l++) {
        if (check_bundle_rows(f, &f->descs[l], err, err_len) != 0) {
            return -1;
        }
    }
    return check_checksum_table(f, err, err_len) == 0 && check_metadata(f, err, err_len) == 0 ? 0 : -1;
}

/* A split layer's down scale table: finite, its entries for the first and last row of ffn_down
 * equal that row's (scale, min) pairs (ripple_split_rows), and its CRC. */
static int check_down_table(struct ripple_file * f, const ripple_layer_desc * d, const uint8_t * table, char * err,
                            size_t err_len) {
    const size_t n = (size_t) d->down_table_size / 4;
    const float * v = (const float *) table;
    int bad = 0;
    for (size_t i = 0; i < n && !bad; i++) {
        bad = !isfinite(v[i]);
    }
    int32_t group;
    ripple_split_info(d->down_src_type, NULL, NULL, &group, NULL); /* checked at open */
    const int64_t n_groups = d->n_ff / group;
    const size_t row = ggml_row_size((enum ggml_type) d->down_src_type, d->n_ff);
    uint8_t * raw = malloc(row);
    float * sm = malloc(sizeof(float) * 2 * (size_t) n_groups);
    if (!raw || !sm) {
        free(raw);
        free(sm);
        return fail(err, err_len, f->path, "out of memory");
    }
    const int rows[2] = { 0, d->n_embd - 1 };
    for (int i = 0; i < 2 && !bad; i++) {
        if (pread_exact(f, raw, row, d->down_offset + (uint64_t) rows[i] * row, err, err_len) != 0) {
            free(raw);
            free(sm);
            return -1;
        }
        ripple_split_rows(d->down_src_type, raw, 1, d->n_ff, NULL, sm);
        for (int64_t k = 0; k < n_groups && !bad; k++) {
            const float * e = v + ((size_t) k * (size_t) d->n_embd + (size_t) rows[i]) * 2;
            bad = e[0] != sm[2 * k] || e[1] != sm[2 * k + 1];
        }
    }
    free(raw);
    free(sm);
    if (bad) {
        return fail(err, err_len, f->path, "layer %d: down scale table does not match ffn_down's scales (file "
                    "modified after conversion?)", d->block);
    }
    if (ripple_crc32c(table, (size_t) d->down_table_size) != d->down_table_crc) {
        return fail(err, err_len, f->path, "layer %d: down scale table does not match its checksum (file damaged "
                    "or modified after conversion)", d->block);
    }
    return 0;
}

int ripple_file_load_blobs(struct ripple_file * f, char * err, size_t err_len) {
    for (int l = 0; l < f->n_layers; l++) {
        ripple_layer_desc * d = &f->descs[l];
        if (d->down_table_size) {
            uint8_t * t = f->blobs[2 * l] = malloc((size_t) d->down_table_size);
            if (!t) {
                return fail(err, err_len, f->path, "out of memory");
            }
            if (pread_exact(f, t, (size_t) d->down_table_size, d->down_table_file_offset, err, err_len) != 0 ||
                check_down_table(f, d, t, err, err_len) != 0) {
                return -1;
            }
            d->down_table = t;
        }
        if (d->predictor_size) {
            uint8_t * b = f->blobs[2 * l + 1] = malloc((size_t) d->predictor_size);
            if (!b) {
                return fail(err, err_len, f->path, "out of memory");
            }
            if (pread_exact(f, b, (size_t) d->predictor_size, d->predictor_file_offset, err, err_len) != 0) {
                return -1;
            }
            if (ripple_crc32c(b, (size_t) d->predictor_size) != d->predictor_crc) {
                return fail(err, err_len, f->path, "layer %d: predictor blob does not match its checksum (file "
                            "damaged or modified after conversion)", d->block);
            }
            d->predictor = b;
        }
    }
    return 0;
}

/* The file read and checked for a model or a standalone store (1), not ripple (0), or -1. */
int ripple_file_read(const char * path, int blobs, ripple_file ** out, char * err, size_t err_len) {
    ripple_file * f = NULL;
    const int r = ripple_file_open(path, &f, err, err_len);
    if (r <= 0 || ripple_file_check_quick(f, err, err_len) != 0 ||
        (blobs && ripple_file_load_blobs(f, err, err_len) != 0)) {
        ripple_file_free(f);
        return r <= 0 ? r : -1;
    }
    *out = f;
    return 1;
}
