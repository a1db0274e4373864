"""Re-quantize a trained small model to a full-int8 inference model ON THE DEVICE, without TensorFlow.

How: each artifact ships a float *inference* model (`{name}.infer.tflite`, logits only, weights as
constant buffers). The manifest records, per weight, the byte offset of its constant buffer and
the axis permutation the converter applied (found by the builder with probe values). The device
writes its trained weights into a copy of that flatbuffer (a numpy byte patch: same sizes, so no
flatbuffer rebuild), then runs ai-edge-quantizer's static int8 recipe (`static_wi8_ai8`: int8
weights AND int8 activations, min/max calibrated on a few hundred local samples). ai-edge-quantizer
imports neither TensorFlow nor torch, so this is all device-side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.runtime.interpreter import make_interpreter

log = logging.getLogger(__name__)
CALIBRATION_BATCH = 32


def patch_inference_model(manifest: dict[str, Any], base: bytes, weights: list[np.ndarray]) -> bytes:
    """The float inference flatbuffer `base` with `weights` written into its constant buffers."""
    inf = manifest["inference"]
    if hashlib.sha256(base).hexdigest() != inf["sha256"]:
        raise ValueError(f"{manifest['name']}: inference model does not match its manifest sha256")
    if len(weights) != len(inf["patches"]):
        raise ValueError(f"expected {len(inf['patches'])} weights, got {len(weights)}")
    buf = bytearray(base)
    for patch, w, info in zip(inf["patches"], weights, manifest["weights"], strict=True):
        w = np.asarray(w, np.float32)
        if list(w.shape) != info["shape"]:
            raise ValueError(f"{info['name']}: shape {w.shape} != {info['shape']}")
        raw = np.ascontiguousarray(w.transpose(patch["perm"])).astype("<f4").tobytes()
        off = patch["offset"]
        if len(raw) != patch["nbytes"]:
            raise ValueError(f"{info['name']}: {len(raw)} bytes, manifest says {patch['nbytes']}")
        buf[off : off + len(raw)] = raw
    return bytes(buf)


def import_quantizer() -> tuple[Any, Any]:
    """ai-edge-quantizer's (quantizer, recipe) modules, importable on a device without scipy.

    Why: the quantizer imports `scipy.linalg` at import time for one algorithm (GPTQ) this agent
    never runs; scipy would be the largest package of a device install (113 MB). A slim install
    (server_app.provisioning.wheels.DEVICE_EXCLUDED) leaves it out, and a stand-in module takes its
    place here: any attribute lookup on it raises, so a path that did need scipy fails loudly.
    The int8 models are byte-identical with and without scipy (tests/device_firmware_py).
    """
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        scipy_mod, linalg = types.ModuleType("scipy"), types.ModuleType("scipy.linalg")

        def _absent(name: str) -> Any:
            raise AttributeError(f"scipy.linalg.{name}: scipy is not installed on this device (GPTQ needs it)")

        linalg.__getattr__ = _absent  # type: ignore[method-assign]
        scipy_mod.linalg = linalg  # type: ignore[attr-defined]
        sys.modules.setdefault("scipy", scipy_mod)
        sys.modules.setdefault("scipy.linalg", linalg)
    from ai_edge_quantizer import quantizer, recipe

    return quantizer, recipe


def quantize_int8_bytes(
    manifest: dict[str, Any], base: bytes, weights: list[np.ndarray], calibration_x: np.ndarray
) -> bytes:
    """Full-int8 (weights + activations) LiteRT model of `weights`, calibrated on `calibration_x`."""
    quantizer, recipe = import_quantizer()

    float_model = patch_inference_model(manifest, base, weights)
    qt = quantizer.Quantizer(bytearray(float_model))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    x = np.asarray(calibration_x, np.float32)
    # Batches of 32, not single samples: min/max calibration averages the per-entry ranges, and
    # single-sample ranges are too narrow (more int8 saturation: measured mean |logit diff| 0.71
    # vs 0.21 on digits) and 10x slower.
    data = {"logits": [{"x": x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)]}
    with warnings.catch_warnings():
        # the calibrator enables experimental_preserve_all_tensors on purpose; its warning is noise
        warnings.simplefilter("ignore", UserWarning)
        calib = qt.calibrate(data, num_threads=1)
        result = qt.quantize(calib, enable_progress_report=False)
    return bytes(result.quantized_model)


def quantize_int8_isolated(
    manifest: dict[str, Any], base: bytes, weights: list[np.ndarray], calibration_x: np.ndarray, workdir: str | Path,
    timeout_s: float = 900.0,
) -> tuple[bytes, dict[str, Any]]:
    """`quantize_int8_bytes` in a short-lived child process; returns (int8 model, child report).

    Why: importing ai-edge-quantizer alone costs ~38 MiB of RSS and calibration more; in the
    agent's process that peak would stack on top of the training interpreters'. The child holds
    only numpy + the quantizer, and its memory is returned to the device when it exits. The
    float model is patched here (numpy only), the child gets it and the calibration rows as files.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    float_path, calib_path, out_path = work / "int8_in.tflite", work / "int8_calib.npy", work / "int8_out.tflite"
    float_path.write_bytes(patch_inference_model(manifest, base, weights))
    np.save(calib_path, np.ascontiguousarray(calibration_x, np.float32))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "device_firmware_py.runtime.quantize", str(float_path), str(calib_path), str(out_path)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )  # fmt: skip
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(f"int8 quantizer child failed rc={proc.returncode}: {proc.stderr[-800:]}")
        report: dict[str, Any] = next((json.loads(ln) for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), {})
        return out_path.read_bytes(), report
    finally:
        for p in (float_path, calib_path, out_path):
            p.unlink(missing_ok=True)


def _quantize_child(float_path: str, calib_path: str, out_path: str) -> dict[str, Any]:
    quantizer, recipe = import_quantizer()

    qt = quantizer.Quantizer(bytearray(Path(float_path).read_bytes()))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    x = np.load(calib_path, allow_pickle=False)
    data = {"logits": [{"x": x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        calib = qt.calibrate(data, num_threads=1)
        result = qt.quantize(calib, enable_progress_report=False)
    blob = bytes(result.quantized_model)
    from device_firmware_py.fileio import atomic_write

    atomic_write(out_path, blob)
    hwm = next((int(ln.split()[1]) / 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith("VmHWM:")), None) if Path("/proc/self/status").exists() else None  # fmt: skip
    return {"bytes": len(blob), "child_peak_rss_mib": hwm}


class TFLiteLogits:
    """Batched logits of any single-input LiteRT model (float or int8 inference model)."""

    def __init__(self, model: bytes | Path, num_threads: int = 2, batch: int = 256):
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.model_bytes = content
        self._interp = make_interpreter(model_content=content, num_threads=num_threads)
        self._batch = batch
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        # A full-int8 model takes and returns int8: (de)quantize at the boundary with its params.
        self._in_dtype = inp["dtype"]
        self._in_q = inp["quantization"]
        self._out_q = out["quantization"] if out["dtype"] != np.float32 else None
        self._interp.resize_tensor_input(self._in_index, [batch, *inp["shape"][1:]])
        try:
            self._interp.allocate_tensors()
        except RuntimeError as exc:
            # XNNPACK refuses some int8 layers (seen on mlp_tiny after training on 5,000 random-teacher
            # proxy rows: "failed to create XNNPACK runtime ... failed to prepare"): builtin kernels instead
            log.warning("int8 model: XNNPACK refused it, using the builtin kernels (%s)", str(exc).splitlines()[0][:120])
            self._interp = make_interpreter(model_content=content, num_threads=num_threads, delegates=False)
            self._interp.resize_tensor_input(self._in_index, [batch, *inp["shape"][1:]])
            self._interp.allocate_tensors()
        self.input_shape = tuple(int(d) for d in inp["shape"][1:])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1, *self.input_shape)
        out = []
        for i in range(0, len(x), self._batch):
            chunk = x[i : i + self._batch]
            n = len(chunk)
            if n < self._batch:
                chunk = np.concatenate([chunk, np.zeros((self._batch - n, *self.input_shape), np.float32)])
            if self._in_dtype != np.float32:
                scale, zp = self._in_q
                info = np.iinfo(self._in_dtype)
                chunk = np.clip(np.round(chunk / scale + zp), info.min, info.max).astype(self._in_dtype)
            self._interp.set_tensor(self._in_index, chunk)
            self._interp.invoke()
            y = np.array(self._interp.get_tensor(self._out_index)[:n])
            if self._out_q is not None:
                scale, zp = self._out_q
                y = (y.astype(np.float32) - zp) * scale
            out.append(y.astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class QuantReport:
    float_accuracy: float | None
    int8_accuracy: float | None
    mean_abs_logit_diff: float
    argmax_agreement: float
    float_param_bytes: int
    float_model_bytes: int
    int8_model_bytes: int
    calibration_samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    float_logits: np.ndarray, int8_logits: np.ndarray, y: np.ndarray | None
) -> tuple[float, float, float | None, float | None]:
    """(mean |diff|, argmax agreement, float acc, int8 acc)."""
    diff = float(np.mean(np.abs(float_logits - int8_logits)))
    fa, ia = float_logits.argmax(1), int8_logits.argmax(1)
    agree = float(np.mean(fa == ia))
    if y is None:
        return diff, agree, None, None
    y = np.asarray(y)
    return diff, agree, float(np.mean(fa == y)), float(np.mean(ia == y))


def int8_report(
    model: Any, calibration_x: np.ndarray, x: np.ndarray, y: np.ndarray | None = None, max_samples: int = 256
) -> tuple[QuantReport, bytes]:
    """Quantize a SmallModel's current weights to int8 and measure it against the float model on x."""
    q = model.quantize_int8(calibration_x, max_samples=max_samples)
    diff, agree, acc_f, acc_q = compare(model.logits(x), TFLiteLogits(q)(x), y)
    report = QuantReport(
        float_accuracy=acc_f,
        int8_accuracy=acc_q,
        mean_abs_logit_diff=diff,
        argmax_agreement=agree,
        float_param_bytes=int(model.manifest.raw["float_bytes"]),
        float_model_bytes=int(model.manifest.raw["inference"]["bytes"]),
        int8_model_bytes=len(q),
        calibration_samples=min(max_samples, len(calibration_x)),
    )
    return report, q


if __name__ == "__main__":  # the child of quantize_int8_isolated: FLOAT_MODEL CALIBRATION_NPY OUT
    print(json.dumps(_quantize_child(*sys.argv[1:4])))
