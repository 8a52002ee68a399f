/* The I/O engine (ripple_io.c): a batch of read requests issued together, through io_uring or
 * reader threads, buffered or O_DIRECT. Its settings (threads, engine) are in ripple.h. */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct ripple_io_req {
    int       fd;
    int       direct; /* fd was opened with O_DIRECT: 1 aligned transfers through a bounce buffer;
                         2 offset and dst 4 KiB-aligned, read straight into dst, which has room for
                         len rounded up to 4 KiB (the end of the file may come after len) */
    uint64_t  offset;
    size_t    len;
    uint8_t * dst;
} ripple_io_req;
/* Issue the requests together (queue depth = the io threads setting) and wait for all; bytes the
 * device transferred (alignment included) in *dev_bytes. 0, or -1 with the error set. */
int ripple_io_run(const ripple_io_req * reqs, int n, const char * path, uint64_t * dev_bytes);
/* O_DIRECT descriptor of the file (same inode as dev/ino), or -1 with the reason in why */
int ripple_open_direct(const char * path, dev_t dev, ino_t ino, char * why, size_t why_len);
/* size bytes at offset, whatever the number of read calls it takes; 0, or -1 with the error set */
int ripple_pread_full(int fd, void * dst, size_t size, uint64_t offset, const char * path);
