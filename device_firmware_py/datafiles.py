"""Device data files read as memory-mapped arrays, so a device holds batches, not copies.

A device's private data and the proxy inputs arrive as `.npz` (what `koala demo` and provisioning
write) or `.npy` (proxy inputs only: one array `x`). An `.npz` member cannot be memory-mapped in
place, so on first use each member is streamed (1 MiB at a time, never the whole array in memory)
into a plain `.npy` in the device's cache directory, then opened with `np.load(mmap_mode="r")`.
Training reads only the rows of each batch from the mapping; the kernel drops those clean pages
again under memory pressure. The cache name carries the source's size and mtime, so a replaced
data file is converted again; float inputs other than float32 are converted chunk by chunk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from device_firmware_py.fileio import atomic_write

CHUNK_ROWS = 1024


def _cache_name(src: Path, key: str) -> str:
    st = src.stat()
    tag = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{src.stem}-{tag}.{key}.npy"


def _copy_member(src: Path, key: str, dst: Path) -> None:
    with zipfile.ZipFile(src) as z:
        name = f"{key}.npy"
        if name not in z.namelist():
            raise KeyError(f"{src}: no array {key!r}")

        def write(f: object) -> None:
            with z.open(name) as member:
                shutil.copyfileobj(member, f, 1 << 20)  # type: ignore[arg-type]

        atomic_write(dst, write)


def _to_float32(src: Path, dst: Path) -> None:
    a = np.load(src, mmap_mode="r")
    tmp = dst.with_name(f".{dst.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=a.shape)
    for i in range(0, len(a), CHUNK_ROWS):
        out[i : i + CHUNK_ROWS] = a[i : i + CHUNK_ROWS]
    out.flush()
    del out, a
    os.replace(tmp, dst)


def open_array(path: str | Path, key: str, cache_dir: str | Path, *, float32: bool = False) -> np.ndarray:
    """Array `key` of an `.npz` (via an mmap-able cache file) or the array of an `.npy`, read-only mapped."""
    src = Path(path)
    if src.suffix == ".npy":
        if key != "x":
            raise KeyError(f"{src}: a .npy file holds one array (x), asked for {key!r}")
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
        if float32 and arr.dtype != np.float32:
            cached = Path(cache_dir) / _cache_name(src, "x.f32")
            if not cached.is_file():
                cached.parent.mkdir(parents=True, exist_ok=True)
                _to_float32(src, cached)
            arr = np.load(cached, mmap_mode="r", allow_pickle=False)
        return arr
    cache = Path(cache_dir)
    cached = cache / _cache_name(src, key)
    if not cached.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{src.stem}-*.{key}.npy"):  # an older version of the same file
            old.unlink(missing_ok=True)
        _copy_member(src, key, cached)
    arr = np.load(cached, mmap_mode="r", allow_pickle=False)
    if float32 and arr.dtype != np.float32:
        f32 = cached.with_name(cached.name.replace(f".{key}.npy", f".{key}.f32.npy"))
        if not f32.is_file():
            _to_float32(cached, f32)
        arr = np.load(f32, mmap_mode="r", allow_pickle=False)
    return arr


def load_small(path: str | Path, key: str) -> np.ndarray:
    """A small member (labels) read into memory."""
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z[key])


def drop_pages(arr: object) -> None:
    """Let go of the pages of a memory-mapped array this process has touched (MADV_DONTNEED on its
    read-only file mapping): they leave the process's RSS and stay in the page cache, so the next
    read costs a page-cache hit, not a disk read. A no-op for in-memory arrays. The agent calls it
    between training phases so a phase's peak does not carry the previous phase's data pages
    (the proxy set: 3 MiB at 1,000 images 28x28x1, 15 MiB at 5,000)."""
    import contextlib
    import mmap

    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # a closed mapping, or no madvise here
            base.madvise(mmap.MADV_DONTNEED)


_FDS: dict[str, tuple[int, int, int]] = {}  # path -> (fd, st_dev, st_ino)


def _fd(path: str) -> int:
    """A read-only descriptor of `path`, kept open; reopened when the path names another file now."""
    st = os.stat(path)
    got = _FDS.get(path)
    if got is not None and (got[1], got[2]) == (st.st_dev, st.st_ino):
        return got[0]
    if got is not None:
        os.close(got[0])
    fd = os.open(path, os.O_RDONLY)
    _FDS[path] = (fd, st.st_dev, st.st_ino)
    return fd


def read_rows(arr: np.ndarray, idx: np.ndarray | slice) -> np.ndarray:
    """`arr[idx]` (a copy), read with pread() when `arr` is a whole memory-mapped .npy (np.load with
    mmap_mode, or np.asarray of one) instead of through the mapping. Why: the page cache hands out
    large folios, so one page fault maps far more than the row asked for -- 32 random rows of a
    5,000-image 28x28x1 proxy file put 14 MiB of it into the process's RSS (measured, kernel 6.18).
    pread copies just the rows; the page cache is used either way. Same bytes, same values."""
    import mmap

    mm = arr if isinstance(arr, np.memmap) else arr.base if isinstance(arr.base, np.memmap) else None
    mapping = getattr(mm, "_mmap", None)
    if mm is None or mapping is None or not getattr(mm, "filename", None) or not arr.flags.c_contiguous or not hasattr(os, "preadv"):
        return np.asarray(arr[idx])
    # Where arr's first row lies in the file: numpy maps from the offset rounded down to the
    # allocation granularity; arr may be any contiguous view into the mapping (a slice, np.asarray).
    start = int(mm.offset) - int(mm.offset) % mmap.ALLOCATIONGRANULARITY
    base = start + arr.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
    rows = np.arange(len(arr))[idx] if isinstance(idx, slice) else np.asarray(idx).reshape(-1)
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    out = np.empty((len(rows), *arr.shape[1:]), arr.dtype)
    flat = out.reshape(len(rows), -1).view(np.uint8)
    fd = _fd(str(mm.filename))
    k = 0
    while k < len(rows):  # runs of consecutive rows: one read each
        j = k + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        want = (j - k) * row_bytes
        if os.preadv(fd, [flat[k:j].data.cast("B")], base + int(rows[k]) * row_bytes) != want:
            return np.asarray(arr[idx])  # short read (file changed under us): the mapping's answer
        k = j
    return out
