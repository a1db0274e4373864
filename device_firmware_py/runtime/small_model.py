"""SmallModel: on-device training, distillation and inference of one LiteRT small-model artifact.

Runs with numpy + ai-edge-litert only. The artifact's signatures (built by `koala zoo build`):
train(x[B..], y[B], lr) -> loss, distill(x[B..], teacher[B,K], temperature, lr) -> loss,
logits(x[N..]) -> logits, get_weights() -> w000.., set_weights(w000..) -> ok (resets Adam).
All signature runners of one Interpreter share the variables, so training through `train` is
visible to `logits`. The training batch is fixed (manifest `train_batch`): we shuffle and wrap the
last partial batch around rather than drop or pad with junk.

Memory: each signature keeps its own activation arena for the life of the Interpreter (batch 32
on 28x28x1: mobilenet_tiny distill ~48 MiB, train ~41 MiB; cnn_small ~20 + ~18 MiB). With
`low_memory=True` the model runs one heavy signature (train, distill, logits) per Interpreter:
it closes the interpreter after each training phase and before switching to another heavy
signature, carrying the weights AND the Adam state in numpy through the `get_state`/`set_state`
signatures that `runtime.state_signatures` adds to the model in memory. The peak is then the
largest single arena instead of their sum, and the numbers are bit-identical to one interpreter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.datafiles import read_rows
from device_firmware_py.fileio import atomic_write
from device_firmware_py.runtime import cmalloc
from device_firmware_py.runtime.interpreter import make_interpreter
from device_firmware_py.runtime.manifest import ArtifactManifest, load_manifest

# Rows per `logits` invoke. Each signature keeps its own activation arena sized by its batch: 512
# rows cost mobilenet_tiny 116 MiB and cnn_small 45 MiB of RSS; 64 rows cost a few MiB at about
# the same speed per sample (measured on 28x28x1, bench/device_class.py).
LOGITS_BATCH = 64
StepCallback = Callable[[int, int, float], None]  # (step done, total steps, loss of that step)
HEAVY = frozenset({"train", "distill", "logits"})  # signatures with a batch-sized activation arena
log = logging.getLogger("koala.device.model")


def _resolve(artifact: str | Path) -> Path:
    p = Path(artifact)
    if p.suffix == ".tflite" and p.exists():
        return p
    return load_manifest(artifact).tflite_path


class SmallModel:
    """One small model on one device. `artifact`: a .tflite path, its .json, or a name like 'cnn_small_28x28x1'."""

    def __init__(self, artifact: str | Path, num_threads: int = 2, low_memory: bool = False,
                 cache_dir: str | Path | None = None, delegates: bool = True):  # fmt: skip
        self.path = _resolve(artifact)
        self.manifest: ArtifactManifest = load_manifest(self.path)
        self.num_threads = num_threads
        self.delegates = delegates  # False: builtin kernels only (no XNNPACK: smaller arenas, slower steps)
        self._content: bytes | None = None  # the model with get_state/set_state (low_memory)...
        self._state_path: Path | None = None  # ...or the cached file of it (low_memory + cache_dir)
        self._state: dict[str, np.ndarray] | None = None  # weights + optimizer state while parked
        self._used: set[str] = set()  # signatures run on the open interpreter
        self._interp: Any = None
        self._runners: dict[str, Any] = {}
        self.low_memory = False
        if low_memory:
            from device_firmware_py.runtime.state_signatures import cached_state_model, with_state_signatures

            try:
                if cache_dir is not None:
                    try:
                        self._state_path = cached_state_model(self.path, cache_dir, self.manifest.sha256)
                    except (ValueError, OSError) as exc:  # e.g. a read-only cache: make it here instead
                        log.warning("%s: state model not cached (%s); made in this process", self.manifest.name, exc)
                if self._state_path is None:
                    self._content, _ = with_state_signatures(self.path.read_bytes())
                self.low_memory = True
            except (ValueError, ImportError, AttributeError) as exc:  # keep one interpreter for the model's life
                log.warning("%s: low_memory off, cannot add state signatures: %s", self.manifest.name, exc)
        self._open()
        # Initial values are baked into the file; re-set them so variables and Adam state are
        # in a defined state whichever signature runs first.
        self.set_weights(self.get_weights())

    def _open(self) -> None:
        if self._content is not None or self._state_path is not None:
            self._interp = make_interpreter(model_path=None if self._state_path is None else str(self._state_path),
                                            model_content=self._content, num_threads=self.num_threads, delegates=self.delegates)  # fmt: skip
            sigs = [*self.manifest.raw["signatures"], "get_state", "set_state"]
        else:
            self._interp = make_interpreter(model_path=str(self.path), num_threads=self.num_threads, delegates=self.delegates)
            sigs = list(self.manifest.raw["signatures"])
        self._runners = {k: self._interp.get_signature_runner(k) for k in sigs}
        self._logits_batch = 0
        self._used = set()

    def _runner(self, sig: str) -> Any:
        """The runner of `sig`. low_memory: one heavy signature per interpreter (park first if another
        one ran on it); a parked model gets a fresh interpreter with its whole state restored."""
        if self.low_memory:
            if sig in HEAVY and (self._used & HEAVY) - {sig}:
                self.park()
            if self._interp is None:
                self._open()
                if self._state is not None:
                    self._runners["set_state"](**self._state)
                    self._state = None
            self._used.add(sig)
        return self._runners[sig]

    def park(self) -> None:
        """low_memory: read the weights and optimizer state into numpy and close the interpreter
        (its activation arenas and delegate workspaces go with it). The next signature call opens a
        fresh one with the state restored, so training goes on exactly as if it had stayed open.
        Without low_memory this does nothing."""
        if not self.low_memory or self._interp is None:
            return
        import gc

        out = self._runners["get_state"]()
        self._state = {k: np.array(v, np.float32) for k, v in out.items()}
        self._runners.clear()
        self._interp = None
        self._used = set()
        gc.collect()
        cmalloc.trim()  # the closed interpreter's kernels and workspaces were freed into the C heap

    @property
    def parked(self) -> bool:
        return self._interp is None

    def release(self) -> list[np.ndarray]:
        """Free the interpreter (each signature's activation arena: ~90 MiB for mobilenet_tiny's
        train + distill) and return the weights; `reopen(weights)` brings the model back. The Adam
        moments restart then, as after a device restart."""
        import gc

        weights = self.get_weights()
        self._runners.clear()
        self._interp = None
        self._state = None
        gc.collect()
        return weights

    def reopen(self, weights: list[np.ndarray]) -> None:
        self._open()
        self.set_weights(weights)

    # ----------------------------------------------------------------- weights
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.manifest.input_shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def get_weights(self) -> list[np.ndarray]:
        if self._interp is None and self._state is not None:  # parked (low_memory)
            return [self._state[n].copy() for n in self.manifest.weight_names]
        out = self._runner("get_weights")()
        return [np.array(out[n], np.float32) for n in self.manifest.weight_names]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Load weights (manifest order) and reset the Adam moments and step."""
        names, shapes = self.manifest.weight_names, self.manifest.weight_shapes
        if len(weights) != len(names):
            raise ValueError(f"{self.manifest.name}: expected {len(names)} weight arrays, got {len(weights)}")
        feed = {}
        for n, s, w in zip(names, shapes, weights, strict=True):
            a = np.ascontiguousarray(w, np.float32)
            if a.shape != s:
                raise ValueError(f"{self.manifest.name}: {n} has shape {a.shape}, expected {s}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{self.manifest.name}: {n} has NaN/Inf")
            feed[n] = a
        self._runner("set_weights")(**feed)

    # ---------------------------------------------------------------- training
    def _x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim == 3 and self.input_shape[2] == 1:
            x = x[..., None]
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"{self.manifest.name}: inputs must be [N,{self.input_shape}], got {x.shape}")
        return x

    def _batches(self, n: int, epochs: int, seed: int, steps: int | None) -> list[np.ndarray]:
        """Index batches of the fixed train size: shuffled per epoch, last one wrapped around."""
        if n == 0:
            return []
        b = self.manifest.train_batch
        rng = np.random.default_rng(seed)
        out: list[np.ndarray] = []
        epoch = 0
        while (steps is None and epoch < epochs) or (steps is not None and len(out) < steps):
            perm = rng.permutation(n)
            full = np.resize(perm, -(-n // b) * b)  # wraps to the start of this epoch's order
            out.extend(full.reshape(-1, b))
            epoch += 1
        return out[:steps] if steps is not None else out

    def _run_steps(
        self, sig: str, batches: list[np.ndarray], feeds: dict[str, Any], on_step: StepCallback | None = None
    ) -> float:
        """One signature call per index batch. Inputs may be memory-mapped: only a batch's rows are read
        (with pread, datafiles.read_rows: the mapping's page faults would map much more)."""
        runner = self._runner(sig)
        losses = []
        total = len(batches)
        for i, idx in enumerate(batches):
            args = {k: (read_rows(v, idx) if isinstance(v, np.ndarray) and v.ndim > 0 else v) for k, v in feeds.items()}
            losses.append(float(runner(**args)["loss"]))
            if on_step is not None:
                on_step(i + 1, total, losses[-1])
        self.park()  # low_memory: this phase's arena is not needed by the next one
        return float(np.mean(losses)) if losses else float("nan")

    def train(
        self, x: np.ndarray, y: np.ndarray, epochs: int = 1, lr: float = 1e-3, seed: int = 0, steps: int | None = None,
        on_step: StepCallback | None = None,
    ) -> float:
        """Cross-entropy Adam steps on (x, y); `steps` overrides `epochs`. Returns the mean loss."""
        x = self._x(x)
        y = np.asarray(y, np.int32).reshape(-1)
        if len(y) != len(x):
            raise ValueError("x and y lengths differ")
        feeds = {"x": x, "y": y, "lr": np.array(lr, np.float32)}
        return self._run_steps("train", self._batches(len(x), epochs, seed, steps), feeds, on_step)

    def distill(
        self,
        x: np.ndarray,
        teacher_logits: np.ndarray,
        temperature: float = 1.0,
        epochs: int = 1,
        lr: float = 1e-3,
        seed: int = 0,
        steps: int | None = None,
        on_step: StepCallback | None = None,
    ) -> float:
        """Adam steps on KL(softmax(teacher/T) || softmax(student/T)) * T^2. Returns the mean loss."""
        x = self._x(x)
        t = np.asarray(teacher_logits, np.float32)
        if t.shape != (len(x), self.num_classes):
            raise ValueError(f"teacher logits must be [{len(x)},{self.num_classes}], got {t.shape}")
        feeds = {
            "x": x,
            "teacher": t,
            "temperature": np.array(temperature, np.float32),
            "lr": np.array(lr, np.float32),
        }
        return self._run_steps("distill", self._batches(len(x), epochs, seed, steps), feeds, on_step)

    # --------------------------------------------------------------- inference
    def logits(self, x: np.ndarray, batch: int = LOGITS_BATCH) -> np.ndarray:
        """Float logits [N, K]. Chunks are padded to one fixed size so the runner never re-allocates."""
        x = self._x(x)
        n = len(x)
        if n == 0:
            return np.zeros((0, self.num_classes), np.float32)
        runner = self._runner("logits")  # before reading _logits_batch: opening a fresh interpreter resets it
        # Grow the chunk size up to `batch` when needed (one re-allocation; variables survive it).
        bs = max(self._logits_batch, min(batch, n))
        self._logits_batch = bs
        out = []
        for i in range(0, n, bs):
            chunk = read_rows(x, slice(i, i + bs))
            m = len(chunk)
            if m < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - m, *self.input_shape), np.float32)])
            out.append(np.array(runner(x=chunk)["logits"][:m], np.float32))
        return np.concatenate(out)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of the float model."""
        pred = self.logits(x).argmax(axis=1)
        return float(np.mean(pred == np.asarray(y).reshape(-1)))

    # ------------------------------------------------------------ int8 export
    def quantize_int8(self, calibration_x: np.ndarray, max_samples: int = 256) -> bytes:
        """Full-int8 inference model of the current weights (device-side, ai-edge-quantizer)."""
        from device_firmware_py.runtime.quantize import quantize_int8_bytes

        x = self._x(calibration_x)[:max_samples]
        base = self.manifest.inference_path.read_bytes()
        return quantize_int8_bytes(self.manifest.raw, base, self.get_weights(), x)

    def quantize_int8_isolated(
        self, calibration_x: np.ndarray, workdir: str | Path, max_samples: int = 256, weights: list[np.ndarray] | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        """`quantize_int8` run in a short-lived child process (its memory peak is not this process's).
        `weights`: the ones `release()` returned (the interpreter is closed then)."""
        from device_firmware_py.runtime.quantize import quantize_int8_isolated

        x = self._x(calibration_x)[:max_samples]
        base = self.manifest.inference_path.read_bytes()
        return quantize_int8_isolated(self.manifest.raw, base, self.get_weights() if weights is None else weights, x, workdir)

    def float_inference_model(self) -> bytes:
        """Float inference-only .tflite with the current weights baked in as constants."""
        from device_firmware_py.runtime.quantize import patch_inference_model

        base = self.manifest.inference_path.read_bytes()
        return patch_inference_model(self.manifest.raw, base, self.get_weights())

    # ------------------------------------------------------------------ state
    def save_state(self, path: str | Path) -> None:
        """Weights + artifact sha256 as .npz, written atomically (tmp file + os.replace)."""
        arrays = {n: w for n, w in zip(self.manifest.weight_names, self.get_weights(), strict=True)}
        # numpy's stub maps **arrays onto savez's `allow_pickle: bool` keyword, hence the ignore
        atomic_write(path, lambda f: np.savez(f, __sha256__=np.array(self.manifest.sha256),
                                              __arch__=np.array(self.manifest.name), **arrays))  # type: ignore[arg-type]  # fmt: skip

    def load_state(self, path: str | Path, strict: bool = True) -> None:
        """Restore weights saved by `save_state`. strict: the artifact sha256 must match too."""
        with np.load(Path(path), allow_pickle=False) as z:
            sha = str(z["__sha256__"])
            if strict and sha != self.manifest.sha256:
                raise ValueError(f"state {path} was saved for artifact sha {sha[:12]}, this is {self.manifest.sha256[:12]}")
            weights = [z[n] for n in self.manifest.weight_names]
        self.set_weights(weights)

    def __repr__(self) -> str:
        return f"SmallModel({self.manifest.name}, params={self.manifest.param_count})"
