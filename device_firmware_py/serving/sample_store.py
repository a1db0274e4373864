"""SampleStore: the bounded on-device store of labeled samples the device's application hands in.

Why a store: a deployed device has no `koala data prepare` cut; its data is born on it (a sensor,
a camera, a user's correction). The application adds labeled samples (local endpoint, spool
directory, or this class directly); the agent trains each round on a snapshot of what the store
holds at the round's start. Raw samples never leave the device: the agent uploads proxy logits /
weights and the store's counts and label histogram only.

Bounds (both enforced on every add, newest first):
  * at most `max_samples` samples overall: the oldest are dropped first;
  * at most `max_per_class` samples of one label (0: no per-class cap): a class the application
    produces a lot of cannot crowd out the rare ones; again the oldest of that class go first.
Memory and disk are therefore bounded by max_samples x one sample (28x28x1 float32: 3 KiB, so
2,000 samples are 6 MiB).

Validation happens before anything is stored: inputs must be float (float16/32/64; stored as
float32), finite, shaped [N, H, W, C] (or [H, W, C] for one sample; the channel axis may be left
out when C is 1) for the model's input shape; labels integers in [0, num_classes), one per input.
A bad batch raises `SampleError` naming what is wrong and stores nothing.

Persistence: `<dir>/samples.npz` (x float32, y int32, seq int64), written with `atomic_write`
(tmp + fsync + rename) after every add, so a restart keeps the store and a power cut leaves the old
or the new content, never half. Arrays are never changed in place: an add builds new arrays and
swaps the reference, so a snapshot taken for a round stays what it was while the application goes
on adding.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.fileio import atomic_write

log = logging.getLogger("koala.device.store")
STORE_FILE = "samples.npz"


class SampleError(ValueError):
    """Samples the store refuses: `str(exc)` says what is wrong (shape, dtype, label, count)."""


@dataclass(frozen=True)
class Snapshot:
    """What the store held at one instant: arrays are read-only and never change afterwards."""

    x: np.ndarray  # [N, H, W, C] float32
    y: np.ndarray  # [N] int64
    version: int  # +1 per accepted add (0: the store as loaded)

    def __len__(self) -> int:
        return int(len(self.y))

    def histogram(self, num_classes: int) -> list[int]:
        return np.bincount(self.y, minlength=num_classes)[:num_classes].tolist()


def validate_samples(x: Any, y: Any, input_shape: tuple[int, ...], num_classes: int,
                     max_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(x float32 [N,H,W,C], y int64 [N]) or SampleError saying exactly what is wrong."""
    xa = np.asarray(x)
    ya = np.asarray(y)
    shape = tuple(int(s) for s in input_shape)
    if xa.dtype.kind != "f":
        raise SampleError(f"x has dtype {xa.dtype}: inputs must be float (float32), scaled as the model "
                          "was trained (e.g. [0, 1]), not raw integers")  # fmt: skip
    xa = _as_batch(xa, shape, "x")
    if not np.all(np.isfinite(xa)):
        raise SampleError("x holds NaN or Inf")
    if ya.dtype.kind == "f":
        if not np.all(np.isfinite(ya)) or np.any(ya != np.round(ya)):
            raise SampleError(f"y has dtype {ya.dtype} with non-integer values: labels must be class indices")
    elif ya.dtype.kind not in "iu":
        raise SampleError(f"y has dtype {ya.dtype}: labels must be integer class indices")
    ya = ya.reshape(-1) if ya.ndim <= 1 else ya
    if ya.ndim != 1:
        raise SampleError(f"y has shape {tuple(np.shape(y))}: labels must be one integer per input, shape [N]")
    if len(ya) != len(xa):
        raise SampleError(f"{len(xa)} inputs but {len(ya)} labels")
    if len(ya) == 0:
        raise SampleError("no samples")
    if max_batch is not None and len(ya) > max_batch:
        raise SampleError(f"{len(ya)} samples in one request, at most {max_batch}")
    if ya.min() < 0 or ya.max() >= num_classes:
        bad = ya[(ya < 0) | (ya >= num_classes)]
        raise SampleError(f"label {int(bad[0])} out of range: labels must be in [0, {num_classes})")
    return np.ascontiguousarray(xa, np.float32), ya.astype(np.int64)


def _as_batch(xa: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """[N, *shape] from [N, *shape], [*shape], or either without a trailing channel axis of 1."""
    if xa.shape[1:] == shape:
        return xa
    if xa.shape == shape:
        return xa[None]
    if shape[-1] == 1 and xa.shape[1:] == shape[:-1]:
        return xa[..., None]
    if shape[-1] == 1 and xa.shape == shape[:-1]:
        return xa[None, ..., None]
    want = "x".join(str(s) for s in shape)
    raise SampleError(f"{name} has shape {list(xa.shape)}: the model takes [N, {', '.join(map(str, shape))}] "
                      f"({want} inputs, N of them) or one input [{', '.join(map(str, shape))}]")  # fmt: skip


class SampleStore:
    """Thread-safe bounded store; see the module docstring for its rules."""

    def __init__(self, directory: str | Path, input_shape: tuple[int, ...], num_classes: int,
                 max_samples: int = 2000, max_per_class: int = 0):  # fmt: skip
        if max_samples < 1 or max_per_class < 0:
            raise ValueError("max_samples must be >= 1 and max_per_class >= 0")
        self.dir = Path(directory)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.max_samples = int(max_samples)
        self.max_per_class = int(max_per_class)
        self._lock = threading.Lock()
        self._x = np.zeros((0, *self.input_shape), np.float32)
        self._y = np.zeros(0, np.int64)
        self._seq = np.zeros(0, np.int64)  # insertion order: larger = newer
        self._next_seq = 0
        self._version = 0
        self.added_total = 0  # accepted by this process (before eviction)
        self.evicted_total = 0
        self._load()

    @property
    def path(self) -> Path:
        return self.dir / STORE_FILE

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                x, y, seq = z["x"], z["y"].astype(np.int64), z["seq"].astype(np.int64)
            x, y = validate_samples(x, y, self.input_shape, self.num_classes)
            if len(seq) != len(y):
                raise SampleError("seq length differs")
        except (OSError, ValueError, KeyError) as exc:  # a store of another model, or damaged: start empty
            bad = self.path.with_name(STORE_FILE + ".unreadable")
            self.path.replace(bad)
            log.warning("sample store unreadable, starting empty; kept as %s: %s", bad, exc)
            return
        x.flags.writeable = y.flags.writeable = False
        self._x, self._y, self._seq = x, y, seq
        self._next_seq = int(seq.max()) + 1 if len(seq) else 0
        self._apply_bounds_locked()
        log.info("sample store loaded samples=%d", len(self._y))

    # --------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(len(self._y))

    def snapshot(self) -> Snapshot:
        """The store now; later adds do not change it (they build new arrays)."""
        with self._lock:
            return Snapshot(self._x, self._y, self._version)

    def histogram(self) -> list[int]:
        return self.snapshot().histogram(self.num_classes)

    def stats(self) -> dict[str, Any]:
        s = self.snapshot()
        return {"num_samples": len(s), "label_histogram": s.histogram(self.num_classes), "version": s.version,
                "max_samples": self.max_samples, "max_per_class": self.max_per_class,
                "added_total": self.added_total, "evicted_total": self.evicted_total}  # fmt: skip

    # --------------------------------------------------------------- writing
    def add(self, x: Any, y: Any, max_batch: int | None = None) -> dict[str, Any]:
        """Validate, append, apply the bounds, persist. Returns {accepted, evicted, num_samples, ...}.
        Raises SampleError (nothing stored) on a bad batch."""
        xa, ya = validate_samples(x, y, self.input_shape, self.num_classes, max_batch)
        with self._lock:
            n_before = len(self._y)
            seq = np.arange(self._next_seq, self._next_seq + len(ya), dtype=np.int64)
            self._next_seq += len(ya)
            self._x = np.concatenate([self._x, xa])
            self._y = np.concatenate([self._y, ya])
            self._seq = np.concatenate([self._seq, seq])
            self._apply_bounds_locked()
            evicted = n_before + len(ya) - len(self._y)
            self._version += 1
            self.added_total += len(ya)
            self.evicted_total += evicted
            self._save_locked()
            out = {"accepted": int(len(ya)), "evicted": int(evicted), "num_samples": int(len(self._y)),
                   "label_histogram": np.bincount(self._y, minlength=self.num_classes)[: self.num_classes].tolist(),
                   "version": self._version}  # fmt: skip
        return out

    def _apply_bounds_locked(self) -> None:
        """Keep the newest samples such that no class exceeds max_per_class and the total max_samples."""
        n = len(self._y)
        order = np.argsort(-self._seq, kind="stable")  # newest first
        keep = np.zeros(n, bool)
        per_class = np.zeros(self.num_classes, np.int64)
        cap = self.max_per_class or self.max_samples
        kept = 0
        for i in order:
            if kept >= self.max_samples:
                break
            c = self._y[i]
            if per_class[c] < cap:
                per_class[c] += 1
                keep[i] = True
                kept += 1
        if kept == n:
            self._x.flags.writeable = self._y.flags.writeable = False
            return
        idx = np.flatnonzero(keep)  # keeps insertion order
        self._x, self._y, self._seq = self._x[idx], self._y[idx], self._seq[idx]
        self._x.flags.writeable = self._y.flags.writeable = False

    def _save_locked(self) -> None:
        x, y, seq = self._x, self._y.astype(np.int32), self._seq
        atomic_write(self.path, lambda f: np.savez(f, x=x, y=y, seq=seq))
