"""Stock llama.cpp with its FFN weights offloaded to flash through mmap (the papers' llama.cpp
baseline), measured token by token.

Run as a script in a fresh interpreter that never imports ripple_gguf (so llama.cpp is stock):

    python _stock_offload.py SPEC.json OUT.json

SPEC: {"model", "tokens", "n_threads", "ffn_ranges": [[offset, size], ...] (file bytes of the FFN
tensors), "disk_stat": "/sys/dev/block/M:m/stat" or ""}. The model is mapped by llama.cpp
(use_mmap, the default). Two passes over the same tokens from an empty context: warm (the whole
file resident: compute only), then cold, where before each token the FFN pages are unmapped from
this process (madvise MADV_DONTNEED on the mapping) and evicted from the page cache
(posix_fadvise DONTNEED), so every FFN page the token touches is read again from the disk.
Per cold token: wall time, /proc/self/io read_bytes, the device's completed reads and sectors
(device-wide: other processes' reads count too), and the FFN bytes left resident after the drop.
"""
import ctypes
import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this package's modules (trace, profile, ...) must not shadow the stdlib's

MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


def _mapping_of(path):
    """(start, end, file offset) of the mappings of ``path`` in this process."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, int(parts[2], 16)))
    return out


def _pages(ranges, maps):
    """Page-aligned (address, length) pieces of the FFN file ranges inside the mappings."""
    pieces = []
    for off, size in ranges:
        a, b = off // PAGE * PAGE, -(-(off + size) // PAGE) * PAGE
        for lo, hi, foff in maps:
            s, e = max(a, foff), min(b, foff + hi - lo)
            if s < e:
                pieces.append((lo + s - foff, e - s, s))
    return pieces


def _resident(pieces):
    total = 0
    for addr, length, _ in pieces:
        vec = (ctypes.c_ubyte * (length // PAGE))()
        if _libc.mincore(ctypes.c_void_p(addr), length, vec) == 0:
            total += sum(b & 1 for b in bytes(vec)) * PAGE
    return total


def _drop(fd, pieces):
    for addr, length, foff in pieces:
        _libc.madvise(ctypes.c_void_p(addr), length, MADV_DONTNEED)
        os.posix_fadvise(fd, foff, length, os.POSIX_FADV_DONTNEED)


def _io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (l.split(":") for l in f)}


def _disk(path):
    if not path:
        return (0, 0)
    with open(path) as f:
        x = f.read().split()
    return (int(x[0]), int(x[2]) * 512)  # reads completed, bytes (sectors of 512)


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main(spec_path, out_path):
    import llama_cpp

    with open(spec_path) as f:
        spec = json.load(f)
    tokens = spec["tokens"]
    llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=len(tokens) + 8, n_batch=1, n_ubatch=1,
                          n_threads=spec["n_threads"], verbose=False)
    pieces = _pages(spec["ffn_ranges"], _mapping_of(spec["model"]))
    if not pieces:
        raise SystemExit(f"{spec['model']}: not memory-mapped by llama.cpp (use_mmap off?)")
    fd = os.open(spec["model"], os.O_RDONLY)
    out = {"warm_s": [], "cold_s": [], "read_bytes": [], "disk_reads": [], "disk_bytes": [], "left_resident": []}
    for _ in range(2):  # warm pass, then cold pass
        llm.reset()
        cold = len(out["warm_s"]) == len(tokens)
        for t in tokens:
            if cold:
                _drop(fd, pieces)
                out["left_resident"].append(_resident(pieces))
                io0, d0 = _io(), _disk(spec["disk_stat"])
            t0 = time.perf_counter()
            llm.eval([t])
            dt = time.perf_counter() - t0
            if cold:
                io1, d1 = _io(), _disk(spec["disk_stat"])
                out["cold_s"].append(dt)
                out["read_bytes"].append(io1["read_bytes"] - io0["read_bytes"])
                out["disk_reads"].append(d1[0] - d0[0])
                out["disk_bytes"].append(d1[1] - d0[1])
            else:
                out["warm_s"].append(dt)
    os.close(fd)
    out["peak_rss"] = _status("VmHWM")
    out["mapped_ffn_bytes"] = sum(p[1] for p in pieces)
    llm.close()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
