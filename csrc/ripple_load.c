/* The start of a load window: before a host loads a file with llama.cpp, the file is identified,
 * read and checked (ripple_file.c) and, for a claiming load, registered (ripple_model.c) so that the
 * backend takes its FFN tensors until ripple_model_end_load. Python's load wrapper and the
 * load-function hook of hosts without Python (ripple_loadhook.c) both come through here. */
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_file.h"
#include "ripple_model.h"
#include "ripple_stats.h"

int ripple_load_begin(const char * path, int claim, char * err, size_t err_len) {
    const int64_t io0 = ripple_proc_read_bytes();
    const uint64_t t0 = ripple_now_ns();
    ripple_file * f = NULL;
    const int r = ripple_file_read(path, claim, &f, err, err_len);
    if (r <= 0 || !claim) {
        ripple_file_free(f);
        return r < 0 ? -1 : 0;
    }
    const int handle = ripple_model_begin_load(path, f->file_size, f->n_layers, f->descs, err, err_len);
    if (handle > 0) {
        ripple_model_set_default_mode(handle, f->default_mode);
        ripple_model_set_load_info(handle, f->expected_tensors, f->default_mode_reason, io0, t0);
        ripple_stats_start();
    }
    ripple_file_free(f);
    return handle > 0 ? handle : -1;
}
