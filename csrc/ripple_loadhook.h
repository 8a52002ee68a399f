/* The load hooks (ripple_loadhook.c; the mapping hook's control is in ripple.h). */
#pragma once

#include <stddef.h>

/* the load-function hook: llama_model_load_from_file of every module of a host process without
 * Python goes through ripple_load_begin */
int ripple_loadfn_hook_install(char * err, size_t err_len);
