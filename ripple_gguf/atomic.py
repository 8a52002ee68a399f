"""Writes that never touch anything but their own new file.

Every file the package writes next to a destination (packed models, variant caches, storage
profiles, JSON results) goes through :func:`atomic_output`: a temporary with a unique name is
created exclusively (O_EXCL) in the destination's directory, written, fsync'd, renamed over the
destination in one step, and the directory fsync'd. A failure at any point removes that temporary
and nothing else: the destination keeps its old content (or stays absent), and a source that
happens to carry the name a fixed-suffix temporary would have had is never opened for writing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Iterator


def same_file(a: os.PathLike | str, b: os.PathLike | str) -> bool:
    """Whether ``a`` and ``b`` are the same file (device and inode, symlinks followed): also true
    for two hard links of one file. False when either does not exist."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _umask() -> int:
    # /proc gives the umask without changing it (os.umask would, racing other threads)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dst: os.PathLike | str, sources: Iterable[os.PathLike | str] = ()) -> None:
    """Raise ValueError when ``dst`` is one of ``sources`` (same inode: through a hard link or a
    symlink too), IsADirectoryError when it is a directory."""
    for src in sources:
        if same_file(src, dst):
            raise ValueError(f"{os.fspath(dst)}: destination is the source file {os.fspath(src)}")
    if os.path.isdir(dst):
        raise IsADirectoryError(21, "destination is a directory", os.fspath(dst))


@contextlib.contextmanager
def atomic_output(dst: os.PathLike | str, *, sources: Iterable[os.PathLike | str] = ()) -> Iterator[str]:
    """Yield the path of a new, empty temporary file in ``dst``'s directory for the caller to
    write (by path; reopening it with "wb" is fine). When the block ends normally the temporary is
    fsync'd and atomically renamed to ``dst``; when it raises, the temporary is removed.

    :func:`check_destination` runs first: nothing is created when ``dst`` is a source or a directory.
    """
    dst = os.fspath(dst)
    check_destination(dst, sources)
    directory = os.path.dirname(os.path.abspath(dst))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    except OSError as e:  # name the destination, not the temporary the user never asked for
        raise type(e)(e.errno, f"cannot create a file in {directory}: {e.strerror}", dst) from None
    st = os.fstat(fd)
    ok = False
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what a plain open() would have created (mkstemp: 0600)
        yield tmp
        os.fsync(fd)  # the caller's writes went through other descriptors of this same inode
        os.replace(tmp, dst)
        ok = True
        _fsync_dir(directory)
    finally:
        os.close(fd)
        if not ok:
            # only ever our own temporary: skip the unlink if the name now points elsewhere
            with contextlib.suppress(FileNotFoundError):
                now = os.stat(tmp, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(tmp)
