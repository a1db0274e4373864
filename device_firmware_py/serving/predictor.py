"""Predictor: the model a device serves to its applications, swapped atomically after each round.

Why a reference swap: the agent re-quantizes its int8 model after every round while applications
keep asking for predictions. A new model is loaded completely first (interpreters built, tensors
allocated, one warm-up invoke), and only then does one attribute assignment make it current.
A request reads that attribute once and uses the model it got to the end, so a request in flight
during a swap finishes on the old model, and no request ever sees a half-loaded one. The old
model is freed when its last request lets go of it.

Each served model holds two LiteRT interpreters of the same bytes: batch 1 (a single prediction
does not pay for 32 padded rows) and batch 32 (bulk requests). A LiteRT interpreter is not
thread-safe, so each served model has a lock: concurrent requests to one model take turns
(a device has a core or two; more threads would not make them faster).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from device_firmware_py.serving.sample_store import SampleError, _as_batch

BULK_BATCH = 32
SINGLE_ROWS = 4  # a remainder of up to this many rows runs row by row on the batch-1 interpreter


class NoModel(RuntimeError):
    """No model is served yet."""


@dataclass(frozen=True)
class ModelInfo:
    """What an application may know about the model that answered it."""

    kind: str  # "int8" (re-quantized after a round) | "float" (before the first int8 model)
    serial: int  # +1 per model loaded into this Predictor (the swap counter)
    round_id: int | None  # the round whose training produced it (None: initial / restored weights)
    model_version: int | None  # the server's large-model version that round answered
    bytes: int
    sha256: str
    input_shape: list[int]
    num_classes: int
    loaded_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ServedModel:
    """One fully loaded model: `model(x) -> logits [N, K]` (float32), thread-safe."""

    def __init__(self, blob: bytes, info: ModelInfo, num_threads: int = 1, batch: int = BULK_BATCH):
        from device_firmware_py.runtime.quantize import TFLiteLogits

        self.info = info
        self._single = TFLiteLogits(blob, num_threads=num_threads, batch=1)
        self._bulk = TFLiteLogits(blob, num_threads=num_threads, batch=batch)
        self.batch = batch
        self.input_shape = tuple(int(s) for s in self._single.input_shape)
        self._lock = threading.Lock()
        self.num_classes = int(self(np.zeros((1, *self.input_shape), np.float32)).shape[1])  # warm-up invoke

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1, *self.input_shape)
        n = len(x)
        full = n - n % self.batch
        parts = []
        with self._lock:
            if full:
                parts.append(self._bulk(x[:full]))
            rest = x[full:]
            if len(rest) and len(rest) <= SINGLE_ROWS:
                parts.extend(self._single(rest[i : i + 1]) for i in range(len(rest)))
            elif len(rest):
                parts.append(self._bulk(rest))
        return np.concatenate(parts) if parts else np.zeros((0, getattr(self, "num_classes", 0)), np.float32)


class Predictor:
    """Holds the current ServedModel; `load` builds a new one and swaps it in atomically."""

    def __init__(self, num_threads: int = 1, batch: int = BULK_BATCH):
        self.num_threads = num_threads
        self.batch = batch
        self._current: ServedModel | None = None
        self._load_lock = threading.Lock()  # one load at a time (serial numbers stay in order)
        self.serial = 0

    @property
    def current(self) -> ServedModel | None:
        return self._current

    def load(self, blob: bytes, kind: str = "int8", round_id: int | None = None,
             model_version: int | None = None) -> ServedModel:  # fmt: skip
        """Build the model completely, then make it current (one reference assignment)."""
        with self._load_lock:
            serial = self.serial + 1
            info = ModelInfo(kind=kind, serial=serial, round_id=round_id, model_version=model_version, bytes=len(blob),
                             sha256=hashlib.sha256(blob).hexdigest(), input_shape=[], num_classes=0)  # fmt: skip
            model = ServedModel(blob, info, num_threads=self.num_threads, batch=self.batch)
            model.info = ModelInfo(**{**asdict(info), "input_shape": list(model.input_shape),
                                      "num_classes": model.num_classes})  # fmt: skip
            self._current = model  # the swap: requests that already hold the old model finish on it
            self.serial = serial
            return model

    def clear(self) -> None:
        """Serve nothing (a low-memory device without serving frees the model during a round)."""
        self._current = None

    def predict(self, x: Any) -> tuple[np.ndarray, np.ndarray, ModelInfo]:
        """(classes [N] int64, logits [N, K] float32, the answering model's info). Inputs must be
        float, shaped [N, H, W, C] or one [H, W, C] (channel axis optional when C is 1); else
        SampleError. NoModel when nothing is served."""
        model = self._current  # read once: this request uses this model to the end
        if model is None:
            raise NoModel("no model is served yet")
        xa = np.asarray(x)
        if xa.dtype.kind != "f":
            raise SampleError(f"x has dtype {xa.dtype}: inputs must be float (float32), scaled as in training")
        xa = _as_batch(xa, model.input_shape, "x")
        if not np.all(np.isfinite(xa)):
            raise SampleError("x holds NaN or Inf")
        logits = model(np.ascontiguousarray(xa, np.float32))
        return logits.argmax(1).astype(np.int64), logits, model.info
