"""Logits -> probabilities, safely: the two helpers fusion and the robust filters both need.

Their own module so that `engine.fusion` (which uses the robust statistics) and `engine.robust`
(whose agreement filter compares softmax outputs) do not import each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from server_app.engine.pages import release_pages


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


_BIG = float(np.finfo(np.float32).max)


def sanitize_logits(logits: np.ndarray) -> np.ndarray:
    """float64 copy with NaN -> 0 and ±inf -> ±float32 max: softmax of the result is always finite."""
    return np.nan_to_num(np.asarray(logits, np.float64), nan=0.0, posinf=_BIG, neginf=-_BIG)


def sanitized_softmax_inplace(p: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """`softmax(sanitize_logits(p), temperature)`, in place on a float64 array of any leading
    shape: the same operations in the same order (bitwise the same values) without a copy per
    step, for a block of many devices at once (the agreement filter ran ~15 numpy calls per device
    per block of proxy rows: 47 s at 10,000 devices)."""
    np.nan_to_num(p, copy=False, nan=0.0, posinf=_BIG, neginf=-_BIG)
    p /= float(temperature)
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


BLOCK_BYTES = 64 << 20  # working set of a block of proxy rows over every device (float64 probabilities)


def probability_blocks(logits: np.ndarray | Sequence[np.ndarray], temperature: float = 1.0,
                       budget: int = BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """(first row, probabilities [D, rows, C] float64) for consecutive blocks of proxy rows, every
    device's `softmax(sanitize_logits(.), temperature)` of those rows.

    Why blocks: what needs every device's value per coordinate (coordinate medians, trimmed means,
    the agreement filter's consensus) depends on one proxy row at a time, so judging a block at a
    time keeps the working set within `budget` however many devices there are (a 10,000-device
    round of 5,000 x 10 logits stacked as float64 was 4 GB). A spilled (file-mapped) device's pages
    leave the process once read (engine.pages) — all of its rows, since the kernel maps pages
    around the ones read (fault-around)."""
    d = len(logits)
    if d == 0:
        return
    if np.ndim(logits[0]) != 2:
        raise ValueError(f"logits must be [D, P, C], got a teacher of shape {np.shape(logits[0])}")
    rows, classes = np.shape(logits[0])
    step = max(1, budget // max(1, d * classes * 8))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        p = np.empty((d, n, classes))
        for i, z in enumerate(logits):
            if np.shape(z) != (rows, classes):
                raise ValueError(f"teacher {i} has logits of shape {np.shape(z)}, teacher 0 {(rows, classes)}")
            p[i] = z[r0 : r0 + n]
            release_pages(z)
        yield r0, sanitized_softmax_inplace(p, temperature)
