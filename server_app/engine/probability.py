"""Logits -> probabilities, safely: the two helpers fusion and the robust filters both need.

Their own module so that `engine.fusion` (which uses the robust statistics) and `engine.robust`
(whose agreement filter compares softmax outputs) do not import each other.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sanitize_logits(logits: np.ndarray) -> np.ndarray:
    """float64 copy with NaN -> 0 and ±inf -> ±float32 max: softmax of the result is always finite."""
    big = float(np.finfo(np.float32).max)
    return np.nan_to_num(np.asarray(logits, np.float64), nan=0.0, posinf=big, neginf=-big)
