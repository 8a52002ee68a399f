/* Load hook: stock llama.cpp maps model files with MAP_POPULATE and posix_madvise(WILLNEED),
 * reading the whole file at load. For a ripple-packed file being loaded, the FFN tensors and
 * the bundle region are never needed through that mapping, so libllama's GOT slots for mmap and
 * posix_madvise are pointed at wrappers that drop the prefetch for that file only. Other files
 * (and every other caller) see the libc functions unchanged. Linux/glibc, x86_64 and aarch64. */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_loadhook.h"
#include "ripple_model.h"

#include "llama.h"

#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__)
#define R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define R_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define R_GLOB_DAT R_AARCH64_GLOB_DAT
#endif

#define MAX_MAPS 16

static pthread_mutex_t g_hook_mu = PTHREAD_MUTEX_INITIALIZER;
static int             g_active;
static struct { uintptr_t begin, end; } g_maps[MAX_MAPS]; /* ripple mappings made in the load window */
static int             g_n_maps;
static int             g_maps_handle; /* the model whose load window made them (they count only inside it) */

static void * hook_mmap(void * addr, size_t len, int prot, int flags, int fd, off_t off) {
    const int handle = (flags & MAP_POPULATE) ? ripple_registry_loading_file(fd) : 0;
    if (handle) {
        flags &= ~MAP_POPULATE;
    }
    void * r = mmap(addr, len, prot, flags, fd, off);
    if (handle && r != MAP_FAILED) {
        pthread_mutex_lock(&g_hook_mu);
        if (g_maps_handle != handle) { /* a new load window: the mappings of earlier ones are gone */
            g_maps_handle = handle;
            g_n_maps = 0;
        }
        if (g_n_maps < MAX_MAPS) {
            g_maps[g_n_maps].begin = (uintptr_t) r;
            g_maps[g_n_maps].end = (uintptr_t) r + len;
            g_n_maps++;
        }
        pthread_mutex_unlock(&g_hook_mu);
    }
    return r;
}

static int hook_posix_madvise(void * addr, size_t len, int advice) {
    if (advice == POSIX_MADV_WILLNEED) {
        const int handle = ripple_registry_loading_handle();
        uintptr_t a = (uintptr_t) addr;
        int skip = 0;
        pthread_mutex_lock(&g_hook_mu);
        for (int i = 0; handle && handle == g_maps_handle && i < g_n_maps; i++) {
            if (a >= g_maps[i].begin && a + len <= g_maps[i].end) {
                skip = 1;
            }
        }
        pthread_mutex_unlock(&g_hook_mu);
        if (skip) {
            return 0;
        }
    }
    return posix_madvise(addr, len, advice);
}

int ripple_loadhook_active(void) {
    return g_active;
}

#if defined(R_JUMP_SLOT)
typedef struct {
    const char * name; /* imported symbol whose GOT slot is pointed at hook */
    void *       hook;
    int          seen;
} hook_slot;

typedef struct {
    int         found;
    int         patched;
    hook_slot * slots;
    int         n_slots;
    const char * only;  /* module file name prefix to patch (NULL: every module but skip_base's) */
    ElfW(Addr)  skip_base;
    char        err[256];
} hook_state;

static int patch_slot(void ** slot, void * fn, const ElfW(Phdr) * phdr, int phnum, ElfW(Addr) base, hook_state * st) {
    (void) phdr;
    (void) phnum;
    (void) base;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t p = (uintptr_t) slot & ~((uintptr_t) page - 1);
    /* the slot may sit in RELRO (BIND_NOW): make the page writable for the store, then restore */
    int was_ro = 0;
    for (int i = 0; i < phnum; i++) {
        if (phdr[i].p_type == PT_GNU_RELRO) {
            uintptr_t b = base + phdr[i].p_vaddr, e = b + phdr[i].p_memsz;
            if ((uintptr_t) slot >= b && (uintptr_t) slot < e) {
                was_ro = 1;
            }
        }
    }
    if (was_ro && mprotect((void *) p, (size_t) page, PROT_READ | PROT_WRITE) != 0) {
        snprintf(st->err, sizeof(st->err), "cannot make libllama's relocation page writable: %s", strerror(errno));
        return -1;
    }
    __atomic_store_n(slot, fn, __ATOMIC_SEQ_CST);
    if (was_ro) {
        mprotect((void *) p, (size_t) page, PROT_READ);
    }
    st->patched++;
    return 0;
}

static void scan_relocs(const ElfW(Rela) * rel, size_t n, const ElfW(Sym) * symtab, const char * strtab,
                        ElfW(Addr) base, const ElfW(Phdr) * phdr, int phnum, hook_state * st) {
    for (size_t i = 0; i < n; i++) {
        unsigned type = (unsigned) ELF64_R_TYPE(rel[i].r_info);
        if (type != R_JUMP_SLOT && type != R_GLOB_DAT) {
            continue;
        }
        const char * name = strtab + symtab[ELF64_R_SYM(rel[i].r_info)].st_name;
        void ** slot = (void **) (base + rel[i].r_offset);
        for (int k = 0; k < st->n_slots; k++) {
            if (!strcmp(name, st->slots[k].name) && *slot != st->slots[k].hook) {
                st->slots[k].seen = 1;
                patch_slot(slot, st->slots[k].hook, phdr, phnum, base, st);
            }
        }
    }
}

static int patch_module(struct dl_phdr_info * info, size_t size, void * data) {
    (void) size;
    hook_state * st = data;
    const char * slash = strrchr(info->dlpi_name, '/');
    const char * file = slash ? slash + 1 : info->dlpi_name;
    if (st->only ? strncmp(file, st->only, strlen(st->only)) != 0 : info->dlpi_addr == st->skip_base) {
        return 0;
    }
    st->found = 1;
    ElfW(Addr) base = info->dlpi_addr;
    const ElfW(Dyn) * dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) {
            dyn = (const ElfW(Dyn) *) (base + info->dlpi_phdr[i].p_vaddr);
        }
    }
    if (!dyn) {
        if (st->only) {
            snprintf(st->err, sizeof(st->err), "libllama.so has no dynamic section");
        }
        return st->only != NULL;
    }
    ElfW(Addr) jmprel = 0, rela = 0, symtab = 0, strtab = 0;
    size_t pltrelsz = 0, relasz = 0;
    long pltrel = 0;
    for (const ElfW(Dyn) * d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
            case DT_JMPREL: jmprel = d->d_un.d_ptr; break;
            case DT_PLTRELSZ: pltrelsz = d->d_un.d_val; break;
            case DT_PLTREL: pltrel = (long) d->d_un.d_val; break;
            case DT_RELA: rela = d->d_un.d_ptr; break;
            case DT_RELASZ: relasz = d->d_un.d_val; break;
            case DT_SYMTAB: symtab = d->d_un.d_ptr; break;
            case DT_STRTAB: strtab = d->d_un.d_ptr; break;
            default: break;
        }
    }
    /* glibc relocates these d_ptr values in place on most targets; be robust to both */
#define ABS(x) ((x) && (x) < base ? (x) + base : (x))
    jmprel = ABS(jmprel);
    rela = ABS(rela);
    symtab = ABS(symtab);
    strtab = ABS(strtab);
#undef ABS
    if (!symtab || !strtab || (jmprel && pltrel != DT_RELA)) {
        if (st->only) {
            snprintf(st->err, sizeof(st->err), "libllama.so uses a relocation format the load hook does not handle");
        }
        return st->only != NULL;
    }
    if (jmprel) {
        scan_relocs((const ElfW(Rela) *) jmprel, pltrelsz / sizeof(ElfW(Rela)), (const ElfW(Sym) *) symtab,
                    (const char *) strtab, base, info->dlpi_phdr, info->dlpi_phnum, st);
    }
    if (rela) {
        scan_relocs((const ElfW(Rela) *) rela, relasz / sizeof(ElfW(Rela)), (const ElfW(Sym) *) symtab,
                    (const char *) strtab, base, info->dlpi_phdr, info->dlpi_phnum, st);
    }
    return st->only != NULL; /* one libllama; every other module */
}

/* ---- the load-function hook: a host without Python (llama-server, llama-cli, llama-bench with
 * GGML_BACKEND_PATH) calls llama_model_load_from_file through its modules' GOT slots, pointed here:
 * the file is identified and checked (ripple_load_begin), its FFN tensors claimed for exactly that
 * load, and a damaged ripple file refused with the file and the problem in ggml's log. ---- */
typedef struct llama_model * (*load_fn)(const char *, struct llama_model_params);
static load_fn g_real_load;

static struct llama_model * hook_load_from_file(const char * path, struct llama_model_params params) {
    char err[1024];
    /* vocabulary-only loads and llama-server's memory-fit pass (no_alloc) are checked, not claimed */
    const int h = path ? ripple_load_begin(path, !params.vocab_only && !params.no_alloc, err, sizeof(err)) : 0;
    if (h < 0) {
        RIPPLE_LOG_ERROR("ripple: refusing to load the model: %s\n", err);
        return NULL;
    }
    struct llama_model * model = g_real_load(path, params);
    if (h > 0) {
        ripple_model_info info = { 0 };
        const int have = ripple_model_get_info(h, &info) == 0;
        ripple_model_end_load(h, model != NULL);
        if (model && have) {
            const int mode = ripple_get_mode() == RIPPLE_MODE_AUTO ? info.default_mode : ripple_get_mode();
            ggml_log_internal(info.bound_tensors == info.expected_tensors ? GGML_LOG_LEVEL_INFO : GGML_LOG_LEVEL_WARN,
                              "ripple: %s: the backend took %d of %d FFN tensors%s; %s mode (%s)\n", path,
                              info.bound_tensors, info.expected_tensors,
                              info.bound_tensors == info.expected_tensors ? "" :
                              " (the others run on llama.cpp's own devices: GPU offload or tensor overrides)",
                              mode == RIPPLE_MODE_SPARSE ? "sparse" : "exact",
                              ripple_get_mode() == RIPPLE_MODE_AUTO ? info.default_mode_reason : "set by RIPPLE_MODE");
        }
    }
    return model;
}

int ripple_loadfn_hook_install(char * err, size_t err_len) {
    pthread_mutex_lock(&g_hook_mu);
    if (!g_real_load) {
        g_real_load = (load_fn) dlsym(RTLD_DEFAULT, "llama_model_load_from_file");
    }
    if (!g_real_load) {
        pthread_mutex_unlock(&g_hook_mu);
        snprintf(err, err_len, "llama_model_load_from_file is not loaded in this process");
        return -1;
    }
    Dl_info self;
    hook_slot slots[] = { { "llama_model_load_from_file", (void *) hook_load_from_file, 0 } };
    hook_state st = { 0 };
    st.slots = slots;
    st.n_slots = 1;
    st.skip_base = dladdr((void *) hook_load_from_file, &self) ? (ElfW(Addr)) self.dli_fbase : 0;
    dl_iterate_phdr(patch_module, &st);
    pthread_mutex_unlock(&g_hook_mu);
    if (!slots[0].seen) {
        snprintf(err, err_len, "no module of this process calls llama_model_load_from_file through a GOT slot");
        return -1;
    }
    return st.err[0] ? (snprintf(err, err_len, "%s", st.err), -1) : 0;
}

int ripple_loadhook_install(char * err, size_t err_len) {
    pthread_mutex_lock(&g_hook_mu);
    if (g_active) {
        pthread_mutex_unlock(&g_hook_mu);
        return 0;
    }
    hook_slot slots[] = { { "mmap", (void *) hook_mmap, 0 }, { "mmap64", (void *) hook_mmap, 0 },
                          { "posix_madvise", (void *) hook_posix_madvise, 0 } };
    hook_state st = { 0 };
    st.slots = slots;
    st.n_slots = 3;
    st.only = "libllama.so";
    dl_iterate_phdr(patch_module, &st);
    int rc = 0;
    if (!st.found) {
        snprintf(err, err_len, "libllama.so is not loaded in this process");
        rc = -1;
    } else if (st.err[0]) {
        snprintf(err, err_len, "%s", st.err);
        rc = -1;
    } else if ((!slots[0].seen && !slots[1].seen) || !slots[2].seen) {
        snprintf(err, err_len, "libllama.so does not import %s through a GOT slot (changed build?)",
                 !slots[0].seen && !slots[1].seen ? "mmap" : "posix_madvise");
        rc = -1;
    }
    g_active = rc == 0 && st.patched > 0;
    pthread_mutex_unlock(&g_hook_mu);
    return rc;
}
#else
int ripple_loadhook_install(char * err, size_t err_len) {
    snprintf(err, err_len, "the load hook supports Linux x86_64 and aarch64 only");
    return -1;
}
int ripple_loadfn_hook_install(char * err, size_t err_len) {
    snprintf(err, err_len, "the load-function hook supports Linux x86_64 and aarch64 only");
    return -1;
}
#endif
