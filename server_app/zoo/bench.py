"""`koala zoo bench`: cost and accuracy of each artifact after a fixed number of on-device steps.

Runs the real device path (SmallModel in LiteRT, then device-side int8 quantization) on
Fashion-MNIST. 32x32x3 artifacts get the same images zero-padded by 2 px and repeated over 3
channels (CIFAR-10 can not be fetched here), so their numbers measure the runtime, not CIFAR.
No TensorFlow needed.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'ed or not) as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(directory: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    def one(stem: str) -> np.ndarray:
        for name in (stem, stem + ".gz"):
            if (directory / name).exists():
                return read_idx(directory / name)
        raise FileNotFoundError(f"{stem}[.gz] not in {directory} (apt-get install dataset-fashion-mnist)")

    xtr = one("train-images-idx3-ubyte").astype(np.float32)[..., None] / 255.0
    xte = one("t10k-images-idx3-ubyte").astype(np.float32)[..., None] / 255.0
    return xtr, one("train-labels-idx1-ubyte").astype(np.int32), xte, one("t10k-labels-idx1-ubyte").astype(np.int32)


def fit_input(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """28x28x1 images to `shape` by centred zero padding and channel repetition."""
    h, w, c = shape
    ph, pw = (h - x.shape[1]) // 2, (w - x.shape[2]) // 2
    if ph or pw:
        x = np.pad(x, [(0, 0), (ph, h - x.shape[1] - ph), (pw, w - x.shape[2] - pw), (0, 0)])
    return np.repeat(x, c, axis=3) if c != x.shape[3] else x


def bench_one(arch: str, shape: tuple[int, int, int], data, steps: int, lr: float, seed: int, calib: int) -> dict:
    from device_firmware_py.runtime.manifest import artifact_path
    from device_firmware_py.runtime.quantize import TFLiteLogits, compare
    from device_firmware_py.runtime.small_model import SmallModel

    xtr, ytr, xte, yte = data
    xtr, xte = fit_input(xtr, shape), fit_input(xte, shape)
    m = SmallModel(artifact_path(arch, shape), num_threads=2)
    m.train(xtr, ytr, steps=20, lr=lr, seed=seed + 1)  # warm-up (allocation, XNNPACK packing)
    timed = min(100, steps)
    t0 = time.perf_counter()
    m.train(xtr, ytr, steps=timed, lr=lr, seed=seed + 2)
    step_ms = 1000 * (time.perf_counter() - t0) / timed
    m.set_weights(SmallModel(m.path).get_weights())  # fresh initial weights, reset Adam
    t0 = time.perf_counter()
    loss = m.train(xtr, ytr, steps=steps, lr=lr, seed=seed)
    train_s = time.perf_counter() - t0
    f_logits = m.logits(xte)
    t0 = time.perf_counter()
    q = m.quantize_int8(xtr[:calib], max_samples=calib)
    quant_s = time.perf_counter() - t0
    diff, agree, acc_f, acc_q = compare(f_logits, TFLiteLogits(q)(xte), yte)
    assert acc_f is not None and acc_q is not None  # compare() scores accuracy when given labels
    s = m.manifest.summary()
    return {
        **s,
        "int8_model_bytes_trained": len(q),
        "steps": steps,
        "lr": lr,
        "train_step_ms": round(step_ms, 2),
        "train_s": round(train_s, 1),
        "mean_train_loss": round(loss, 4),
        "float_acc": round(acc_f, 4),
        "int8_acc": round(acc_q, 4),
        "mean_abs_logit_diff": round(diff, 4),
        "argmax_agreement": round(agree, 4),
        "quantize_s": round(quant_s, 2),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| artifact | params | float B | int8 B | .tflite B | fwd FLOP/sample | train FLOP/sample | "
            "ms/train step (B=32) | float acc | int8 acc | mean abs logit diff |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['param_count']:,} | {r['float_bytes']:,} | {r['int8_model_bytes_trained']:,} | "
            f"{r['tflite_file_bytes']:,} | {r['forward_flops_per_sample']:,} | {r['train_flops_per_sample']:,} | "
            f"{r['train_step_ms']:.1f} | {r['float_acc']:.4f} | {r['int8_acc']:.4f} | {r['mean_abs_logit_diff']:.3f} |"
        )
    return "\n".join(lines)
