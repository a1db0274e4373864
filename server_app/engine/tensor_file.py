"""TensorFile: arrays appended to one file, then read back as views of one read-only mapping.

Why: what a round accumulates per device (the accepted tensors; the server-side logits of every
device's model) grows with the fleet. Written here as it is produced and mapped when it is used,
it costs page cache the kernel can reclaim instead of process heap, and the streaming consumers
hand the pages back once read (`engine.pages.release_pages`). The file is unlinked as soon as it
is mapped; the mapping keeps it alive until the last view is dropped, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ALIGN = 16  # every array starts on a 16-byte boundary of the file (aligned numpy views)


@dataclass(frozen=True)
class Slot:
    """Where one appended array lies in the file."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


class TensorFile:
    """`append(array) -> Slot` while writing; `map()` once; then `view(slot)`; `close()` discards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in map()/close()
        self._lock = threading.Lock()
        self._end = 0
        self._base: np.memmap | None = None
        self.nbytes = 0  # array bytes written (padding excluded)

    def append(self, a: np.ndarray) -> Slot:
        a = np.ascontiguousarray(a)
        with self._lock:
            if self._f.closed:
                raise RuntimeError(f"{self.path.name}: already mapped or closed")
            pad = (-self._end) % _ALIGN
            if pad:
                self._f.write(b"\0" * pad)
                self._end += pad
            slot = Slot(self._end, a.dtype.str, tuple(a.shape))
            self._f.write(a.tobytes())
            self._end += a.nbytes
            self.nbytes += a.nbytes
            return slot

    def map(self) -> None:
        """Finish writing, map the file read-only and unlink it."""
        with self._lock:
            if not self._f.closed:
                self._f.close()
            if self._end and self._base is None:
                self._base = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self._end,))
            self._unlink()

    def view(self, s: Slot) -> np.ndarray:
        """The array at `s`: a read-only view of the mapping (numpy raises on a write)."""
        if self._base is None:
            raise RuntimeError(f"{self.path.name}: map() first")
        n = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        return self._base[s.offset : s.offset + n].view(np.dtype(s.dtype)).reshape(s.shape)

    def close(self) -> None:
        """Discard what was written (views already taken stay valid)."""
        with self._lock:
            if not self._f.closed:
                self._f.close()
            self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def spilled(arrays: Iterable[np.ndarray], path: str | Path | None) -> list[np.ndarray]:
    """`arrays` (an iterable, consumed one at a time) as views of a TensorFile at `path`; with
    path None, as a list in memory (the simulation, tests)."""
    if path is None:
        return list(arrays)
    tf = TensorFile(path)
    try:
        slots = [tf.append(a) for a in arrays]
        tf.map()
        return [tf.view(s) for s in slots]
    finally:
        tf.close()
