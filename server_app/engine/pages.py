"""release_pages: tell the kernel that a file-mapped array's pages are no longer needed.

Why: a deployed round's accepted tensors are views of one read-only file mapping
(`server_app.rounds.spill`). Reading every teacher once (fusion, the agreement filter) would
otherwise leave the whole file resident in the server process (RSS grows with the fleet again,
if only with reclaimable pages). The streaming consumers call this after each teacher or block:
the pages leave the process (they stay in the page cache; a later read maps them back), so what
aggregation holds stays bounded by what it works on at once. For an in-memory array it does
nothing.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np


def _mapping(a: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """(the mmap under `a`, the address where that mapping starts), if `a` views a read-only one."""
    base: np.ndarray | None = a
    while isinstance(base, np.ndarray):
        if isinstance(base.base, mmap.mmap):  # the root array of the mapping (views carry no address)
            if getattr(base, "mode", None) != "r":  # copy-on-write pages may hold writes: keep them
                return None
            skip = int(getattr(base, "offset", 0) or 0) % mmap.ALLOCATIONGRANULARITY
            return base.base, base.__array_interface__["data"][0] - skip
        base = base.base
    return None


# Linux maps up to this much around a faulting page of a file mapping (fault-around,
# /sys/kernel/debug/fault_around_bytes, 64 KiB by default): reading one array also maps pages of
# its neighbours, which then stay. Measured: a pass of fusion over 1,000 spilled 100 kB teachers
# left 30 % of the file resident when only each teacher's own pages were released.
FAULT_AROUND_BYTES = 64 << 10


def release_pages(a: object, margin: int = FAULT_AROUND_BYTES) -> None:
    """Drop the pages `a` spans, and `margin` bytes either side, from this process (MADV_DONTNEED
    on a read-only file mapping: they are re-read from the file if touched again). No-op for
    anything else."""
    if not isinstance(a, np.ndarray) or a.size == 0 or not a.flags.c_contiguous:
        return
    found = _mapping(a)
    if found is None:
        return
    mm, start = found
    off = a.__array_interface__["data"][0] - start
    lo = max(0, off - margin)
    lo -= lo % mmap.PAGESIZE
    hi = off + a.nbytes + margin
    hi = min(len(mm), hi + (-hi) % mmap.PAGESIZE)
    with contextlib.suppress(OSError, ValueError):  # not supported here: only memory stays higher
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
