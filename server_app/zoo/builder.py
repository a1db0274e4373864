"""Build the small-model artifacts: training .tflite, float inference .tflite, manifest JSON.

Deterministic: weights come from a seeded numpy RNG, so a rebuild gives the same manifest (and
the same logits for the same weights) even where the converter's flatbuffer bytes might differ.
Imports TensorFlow at import time: import it only from `koala zoo build` or the builder tests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from device_firmware_py.runtime import flatbuffer  # noqa: E402
from server_app.zoo import tf_graph  # noqa: E402
from server_app.zoo.archs import (  # noqa: E402
    FLOPS_METHOD,
    ArchPlan,
    artifact_name,
    plan,
    train_batch,
)

log = logging.getLogger(__name__)
SIGNATURES = ["train", "distill", "logits", "get_weights", "set_weights"]
BUILDER_VERSION = 1
# int8_bytes in the manifest: quantize the inference model calibrated on seeded uniform [0,1]
# inputs. Size depends only on the graph, not on the calibration values.
CALIBRATION_SAMPLES = 64


def _seed_for(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) ^ seed) & 0x7FFFFFFF


def init_weights(p: ArchPlan, seed: int = 0) -> list[np.ndarray]:
    """He-normal kernels (ReLU follows every hidden layer), Glorot-uniform classifier, zero bias."""
    rng = np.random.default_rng(_seed_for(artifact_name(p.arch, p.input_shape), seed))
    out: list[np.ndarray] = []
    last_kernel = max(i for i, w in enumerate(p.weights) if w.layer.endswith("/kernel"))
    for i, w in enumerate(p.weights):
        if w.layer.endswith("/bias"):
            out.append(np.zeros(w.shape, np.float32))
            continue
        fan_in = int(np.prod(w.shape[:-1]))  # conv3: 3*3*cin, dw3: 3*3, pw/dense: cin
        fan_out = int(w.shape[-1]) if len(w.shape) == 2 else int(np.prod(w.shape[:2]) * w.shape[-1])
        if i == last_kernel:
            lim = np.sqrt(6.0 / (fan_in + fan_out))
            out.append(rng.uniform(-lim, lim, w.shape).astype(np.float32))
        else:
            out.append((rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
    return out


def probe_weights(p: ArchPlan) -> list[np.ndarray]:
    """Distinct non-zero values per weight, so each constant buffer can be located unambiguously."""
    rng = np.random.default_rng(12345)
    return [rng.uniform(0.05, 1.0, w.shape).astype(np.float32) for w in p.weights]


def _convert(module: tf.Module, signatures: dict, resource_variables: bool) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tf.saved_model.save(module, d, signatures=signatures)
        conv = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=list(signatures))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.experimental_enable_resource_variables = resource_variables
        return bytes(conv.convert())


def _locate_patches(buf: bytes, weights: list[np.ndarray], p: ArchPlan) -> list[dict]:
    """For each weight: byte offset of its constant in `buf` and the axis permutation applied.

    The converter stores e.g. dense/pointwise kernels transposed ([out,in]) and conv kernels as
    OHWI; we try every permutation of the weight's axes and require exactly one match in the file.
    """
    patches = []
    for info, w in zip(p.weights, weights, strict=True):
        hits = []
        for perm in itertools.permutations(range(w.ndim)):
            raw = np.ascontiguousarray(w.transpose(perm)).astype("<f4").tobytes()
            off = buf.find(raw)
            while off != -1:
                hits.append((off, list(perm)))
                off = buf.find(raw, off + 1)
        uniq = {h[0]: h for h in hits}
        if len(uniq) != 1:
            raise RuntimeError(f"{info.name} ({info.layer}) found {len(uniq)} times in the inference model")
        off, found = next(iter(uniq.values()))
        patches.append({"name": info.name, "offset": off, "perm": found, "nbytes": w.size * 4})
    return patches


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def build(
    arch: str,
    input_shape: tuple[int, int, int],
    out_dir: Path,
    num_classes: int = 10,
    seed: int = 0,
    batch: int | None = None,
) -> dict:
    """Build one artifact triple into `out_dir`; returns its manifest. batch: the fixed training
    batch of the train/distill signatures (default: `archs.train_batch(arch)`)."""
    from device_firmware_py.runtime.quantize import quantize_int8_bytes

    batch = train_batch(arch) if batch is None else int(batch)
    p = plan(arch, input_shape, num_classes)
    name = artifact_name(arch, input_shape)
    init = init_weights(p, seed)
    model = tf_graph.TrainableModel(p, init, batch)
    train_buf = _convert(model, model.signatures(), True)
    bad = flatbuffer.non_builtin_ops(train_buf)
    if bad:
        raise RuntimeError(f"{name}: non-builtin ops in the training model: {sorted({b.op for b in bad})}")
    keys = flatbuffer.signature_keys(train_buf)
    if sorted(keys) != sorted(SIGNATURES):
        raise RuntimeError(f"{name}: signatures {keys} != {SIGNATURES}")

    probe = probe_weights(p)
    inf = tf_graph.InferenceModel(p, probe)
    infer_buf = _convert(inf, {"logits": inf.logits.get_concrete_function()}, False)
    bad = flatbuffer.non_builtin_ops(infer_buf)
    if bad:
        raise RuntimeError(f"{name}: non-builtin ops in the inference model: {sorted({b.op for b in bad})}")
    patches = _locate_patches(infer_buf, probe, p)

    out_dir.mkdir(parents=True, exist_ok=True)
    train_file, infer_file = f"{name}.tflite", f"{name}.infer.tflite"
    manifest = {
        "name": name,
        "arch": arch,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "train_batch": batch,
        "seed": seed,
        "builder_version": BUILDER_VERSION,
        "layers": [[layer.kind, layer.out] for layer in p.layers],
        "param_count": p.param_count,
        "weights": [{"name": w.name, "layer": w.layer, "shape": list(w.shape)} for w in p.weights],
        "float_bytes": p.param_count * 4,
        "int8_bytes": 0,
        "tflite_file": train_file,
        "tflite_file_bytes": len(train_buf),
        "sha256": _sha(train_buf),
        "signatures": SIGNATURES,
        "forward_flops_per_sample": p.forward_flops,
        "train_flops_per_sample": p.train_flops,
        "flops_method": FLOPS_METHOD,
        "inference": {
            "file": infer_file,
            "bytes": len(infer_buf),
            "sha256": _sha(infer_buf),
            "patches": patches,
        },
    }
    calib = np.random.default_rng(seed).uniform(0.0, 1.0, (CALIBRATION_SAMPLES, *input_shape)).astype(np.float32)
    int8 = quantize_int8_bytes(manifest, infer_buf, init, calib)
    manifest["int8_bytes"] = len(int8)
    (out_dir / train_file).write_bytes(train_buf)
    (out_dir / infer_file).write_bytes(infer_buf)
    (out_dir / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("built %s: %d params, %d bytes", name, p.param_count, len(train_buf))
    return manifest
