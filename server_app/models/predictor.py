"""LargePredictor: the server's current large model, serving predictions (POST /api/v1/predict and the
devices' cascade requests over MQTT, server_app/predict_service.py).

What it serves: the newest registered large-model version that has a portable export
(`models/export/vNNNNN`, server_app/models/export.py), loaded from its safetensors + card
(`export.load_large`: no pickle). Never the live strategy's module: that one is being trained by the
round in progress; an exported version never changes.

Reloads: after each published version the services call `notify()`; besides, `current()` looks at
the registry at most every `recheck_s` (a process without rounds, `koala serve --role api`, learns of
new versions this way). A new version is loaded completely and then swapped in by one reference
assignment: a prediction in flight finishes on the model it started with.

Inputs are NHWC float32 scaled as the card's `input.normalisation` says; [H, W, C] (one input) and,
when C is 1, [N, H, W] are accepted. At most `max_batch` rows per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("koala.predictor")
MAX_BATCH = 256


class PredictInputError(ValueError):
    """The inputs do not fit the model (shape, dtype, NaN, too many rows); the message says how."""


class NoLargeModel(RuntimeError):
    """No large-model version with a portable export exists yet (no round has published one)."""


@dataclass(frozen=True)
class Loaded:
    version: int
    round_id: int | None
    edir: Path
    input_shape: tuple[int, ...]  # [H, W, C]
    classes: list[str]
    model: Any  # torch.nn.Module, eval, CPU


@dataclass(frozen=True)
class Prediction:
    classes: np.ndarray  # [N] int64
    probabilities: np.ndarray  # [N, K] float32
    version: int
    round_id: int | None
    class_names: list[str]


def latest_export_in_registry(registry: Any) -> Callable[[], Path | None]:
    """A locator: the export directory of the newest registered large-model version (None: none yet)."""
    from server_app.models import export as mx
    from server_app.registry import crud

    def locate() -> Path | None:
        with registry.session() as s:
            mv = crud.latest_model_version(s, "large", "large")
            path = None if mv is None else mv.path
        if path is None:
            return None
        try:
            edir = mx.export_dir_of_checkpoint(path)
        except mx.ExportError:
            return None
        return edir if (edir / mx.CARD_NAME).is_file() else None

    return locate


def latest_export_in_dir(models_dir: str | Path) -> Callable[[], Path | None]:
    """A locator over a models directory alone (benchmarks, a copied data directory)."""
    from server_app.models import export as mx

    def locate() -> Path | None:
        rows = [r for r in mx.list_versions(models_dir) if r.get("export") and not r.get("error")]
        return Path(rows[-1]["export"]) if rows else None

    return locate


def as_batch(x: Any, shape: tuple[int, ...], max_batch: int = MAX_BATCH) -> np.ndarray:
    """x as float32 [N, *shape], or PredictInputError saying what is wrong."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise PredictInputError(f"inputs must be numbers, got dtype {a.dtype}")
    if a.dtype.kind != "f":
        raise PredictInputError(f"inputs have dtype {a.dtype}: send floats scaled as in training (the model card's "
                                "input.normalisation, e.g. pixel / 255)")  # fmt: skip
    if a.shape == shape:
        a = a[None]
    elif len(shape) == 3 and shape[-1] == 1 and a.shape[1:] == shape[:2]:
        a = a[..., None]
    elif len(shape) == 3 and shape[-1] == 1 and a.shape == shape[:2]:
        a = a[None, ..., None]
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != tuple(shape):
        raise PredictInputError(f"inputs of shape {list(np.shape(x))} do not fit the model: send [N, {', '.join(map(str, shape))}] "
                                f"(NHWC) or one [{', '.join(map(str, shape))}]")  # fmt: skip
    if len(a) == 0:
        raise PredictInputError("no inputs (N = 0)")
    if len(a) > max_batch:
        raise PredictInputError(f"{len(a)} inputs in one request; at most {max_batch}")
    a = np.ascontiguousarray(a, np.float32)
    if not np.isfinite(a).all():
        raise PredictInputError("inputs hold NaN or Inf")
    return a


class LargePredictor:
    """`predict(x) -> Prediction` with the newest exported large model; thread-safe."""

    def __init__(self, locate: Callable[[], Path | None], *, recheck_s: float = 2.0, max_batch: int = MAX_BATCH) -> None:
        self._locate = locate
        self.recheck_s = recheck_s
        self.max_batch = max_batch
        self._loaded: Loaded | None = None
        self._checked = -1e18
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one forward pass at a time: the server's cores are the rounds' too
        self.requests = 0
        self.loads = 0

    def notify(self) -> None:
        """A new version was published: look at the next request (or now, from the caller's thread)."""
        self._checked = -1e18

    def current(self) -> Loaded:
        """The model to answer with (reloaded when a newer version exists); NoLargeModel when none."""
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            with self._load_lock:
                if time.monotonic() - self._checked >= self.recheck_s:
                    self._refresh()
                    self._checked = time.monotonic()
        got = self._loaded
        if got is None:
            raise NoLargeModel("no large model yet: the server publishes one with the first round (version 0 at start)")
        return got

    def _refresh(self) -> None:
        edir = self._locate()
        if edir is None or (self._loaded is not None and self._loaded.edir == edir):
            return
        from server_app.models import export as mx

        try:
            card = mx.read_card(edir)
            model = mx.load_large(edir)
        except Exception as exc:  # a broken export must not take predictions down: keep serving the old one
            log.error("large model not loaded dir=%s error=%r", edir, exc)
            return
        self._loaded = Loaded(version=int(card["version"]), round_id=card.get("round"), edir=Path(edir),
                              input_shape=tuple(int(s) for s in card["input"]["shape"]),
                              classes=[str(c) for c in card["output"]["classes"]], model=model)  # fmt: skip
        self.loads += 1
        log.info("predictor serves large model version=%d dir=%s", self._loaded.version, edir)

    def predict(self, x: Any) -> Prediction:
        import torch

        m = self.current()  # read once: this request uses this model to the end
        xb = as_batch(x, m.input_shape, self.max_batch)
        with self._run_lock, torch.no_grad():
            logits = m.model(torch.from_numpy(xb)).float()
            probs = torch.softmax(logits, dim=1).numpy().astype(np.float32)
        self.requests += 1
        return Prediction(classes=probs.argmax(1).astype(np.int64), probabilities=probs, version=m.version,
                          round_id=m.round_id, class_names=m.classes)  # fmt: skip
