"""The page cache seen from one file: evict its pages, count those resident (for load and memory
measurements: what a process read through the cache)."""
from __future__ import annotations

import ctypes
import os


def drop_pages(*paths: os.PathLike | str) -> None:
    """Evict the files' clean pages from the page cache (dirty ones are written first), so the next
    reader reads them from the disk itself."""
    for p in paths:
        fd = os.open(os.fspath(p), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: os.PathLike | str) -> int:
    """Bytes of ``path`` in the page cache (mapped without touching, then mincore)."""
    path = os.fspath(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
    finally:
        os.close(fd)
    try:
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        pages = sum(b & 1 for b in bytes(vec))
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)
    return min(pages * page, size)
