"""Communication: bytes up/down per device per round, and what logit quantization costs in accuracy.

Bytes come from the contract codec's actual frames (header + body), not from param counts:
  koala (logits only)        down: teacher logits [P, C]; up: proxy logits [P, C]; float32/float16/int8
  koala_homo (+ weights)     up also carries the small model's float32 weights
  fedavg_small               down/up: the small model's float32 weights
  fedavg_large               down/up: the large torch model's float32 weights (conventional FL)
The baseline for bytes is fedavg_large (what KOALA avoids shipping).

Accuracy cost (small real run): D devices train cnn_small in LiteRT on a Dirichlet split, publish
proxy logits; each wire dtype's frames are decoded, fused (engine fuse_logits, mean) and the large
model is reverse-distilled (engine reverse_distill) from the same initial weights. Baseline: float32.
Wire weights are float32 (lossless), so FedAvg's wire encoding costs no accuracy by construction.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "communication"
DTYPES = ("float32", "float16", "int8")


def _frame_bytes(kind: str, *, logits: np.ndarray | None, weights: list[np.ndarray] | None, dtype: str = "float16") -> int:
    from device_firmware_py.contract import codec
    from device_firmware_py.contract import messages as cm

    if kind == "down":
        from device_firmware_py.contract.plan import TrainingPlan

        plan = TrainingPlan(upload=("logits",) if weights is None else ("weights",))
        msg: Any = cm.Assignment(round_id=1, device_id="dev-00001", arch="cnn_small", plan=plan,
                                 deadline=time.time() + 60, proxy_digest="0" * 64, teacher_logits=logits, weights=weights)  # fmt: skip
    else:
        msg = cm.Result(round_id=1, device_id="dev-00001", arch="cnn_small", num_samples=600, label_histogram=[60] * 10,
                        metrics={"train_loss": 0.5, "t_device_s": 1.0}, proxy_digest="0" * 64, proxy_logits=logits,
                        weights=weights)  # fmt: skip
    return len(codec.encode_frame(msg, logits_dtype=dtype, max_bytes=1 << 30))


def bytes_table(proxy: int, classes: int, shape: tuple[int, int, int], large_kw: dict[str, Any]) -> list[dict[str, Any]]:
    from device_firmware_py.runtime.small_model import SmallModel
    from server_app.models.large import build_large

    logits = (np.random.default_rng(0).standard_normal((proxy, classes)) * 3).astype(np.float32)
    small = SmallModel(f"cnn_small_{shape[0]}x{shape[1]}x{shape[2]}", num_threads=1).get_weights()
    large = [p.detach().numpy().astype(np.float32) for p in build_large(shape, classes, **large_kw).state_dict().values()]
    rows = []
    for d in DTYPES:
        rows.append({"protocol": f"koala logits {d}", "down": _frame_bytes("down", logits=logits, weights=None, dtype=d),
                     "up": _frame_bytes("up", logits=logits, weights=None, dtype=d)})  # fmt: skip
    rows.append({"protocol": "koala_homo logits f16 + small weights", "down": _frame_bytes("down", logits=logits, weights=small),
                 "up": _frame_bytes("up", logits=logits, weights=small)})  # fmt: skip
    rows.append({"protocol": "fedavg_small weights f32", "down": _frame_bytes("down", logits=None, weights=small),
                 "up": _frame_bytes("up", logits=None, weights=small)})  # fmt: skip
    rows.append({"protocol": "fedavg_large weights f32", "down": _frame_bytes("down", logits=None, weights=large),
                 "up": _frame_bytes("up", logits=None, weights=large)})  # fmt: skip
    base = rows[-1]["down"] + rows[-1]["up"]
    for r in rows:
        r["total"] = r["down"] + r["up"]
        r["vs_fedavg_large"] = r["total"] / base
        r["reduction"] = 1 - r["total"] / base
    return rows


def accuracy_cost(quick: bool, seed: int = 0) -> dict[str, Any]:
    """Logit wire dtype -> fused soft-label error and large-model accuracy after reverse KD."""
    import torch

    from device_firmware_py.contract import codec
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.runtime.small_model import SmallModel
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split
    from server_app.engine.distill import reverse_distill
    from server_app.engine.fusion import fuse_logits
    from server_app.models.large import accuracy, build_large

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if quick:
        ds_name, devices, proxy_size, train_size, epochs, rkd_epochs, n_test = "digits", 4, 400, 900, 2, 2, 400
    else:
        ds_name, devices, proxy_size, train_size, epochs, rkd_epochs, n_test = "fashion-mnist", 10, 2000, 8000, 1, 1, 2000
    ds = load_dataset(ds_name, seed=seed)
    split = make_federated_split(ds.y_train, devices, proxy_size, seed, alpha=0.5, train_size=train_size)
    shape = ds.input_shape
    proxy_x = ds.x_train[split.proxy_indices]
    x_test, y_test = ds.x_test[:n_test], ds.y_test[:n_test]
    t0 = time.perf_counter()
    dev_logits, dev_acc = [], []
    for i, idx in enumerate(split.device_indices):
        m = SmallModel(f"cnn_small_{shape[0]}x{shape[1]}x{shape[2]}", num_threads=1)
        m.train(ds.x_train[idx], ds.y_train[idx], epochs=epochs, seed=seed + i)
        dev_logits.append(m.logits(proxy_x))
        dev_acc.append(m.evaluate(x_test, y_test))
    t_devices = time.perf_counter() - t0
    fused: dict[str, np.ndarray] = {}
    wire_err: dict[str, float] = {}
    for d in DTYPES:
        got = []
        for i, lg in enumerate(dev_logits):
            frame = codec.encode_frame(cm.Result(round_id=1, device_id=f"dev-{i:05d}", arch="cnn_small", num_samples=1,
                                                 proxy_logits=lg), logits_dtype=d)  # fmt: skip
            got.append(codec.decode_frame(frame, cm.Result).proxy_logits)
        wire_err[d] = float(max(np.max(np.abs(g - lg)) for g, lg in zip(got, dev_logits, strict=True)))
        fused[d] = fuse_logits(got, "mean")
    ref = fused["float32"]
    out: dict[str, Any] = {"dataset": ds_name, "devices": devices, "proxy": proxy_size, "device_test_acc_mean": float(np.mean(dev_acc)),
                           "t_devices_s": t_devices, "per_dtype": {}}  # fmt: skip
    for d in DTYPES:
        large = build_large(shape, ds.num_classes, seed=seed, width=16)
        t1 = time.perf_counter()
        reverse_distill(large, proxy_x, fused[d].astype(np.float32), T=1.0, epochs=rkd_epochs, seed=seed)
        p, q = np.clip(ref, 1e-12, 1), np.clip(fused[d], 1e-12, 1)
        out["per_dtype"][d] = {
            "max_abs_logit_error": wire_err[d],
            "fused_max_abs_prob_diff": float(np.max(np.abs(fused[d] - ref))),
            "fused_kl_vs_float32": float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))),
            "fused_argmax_agreement": float(np.mean(fused[d].argmax(1) == ref.argmax(1))),
            "large_test_acc_after_rkd": float(accuracy(large, x_test, y_test)),
            "t_rkd_s": time.perf_counter() - t1,
        }
    base = out["per_dtype"]["float32"]["large_test_acc_after_rkd"]
    for d in DTYPES:
        out["per_dtype"][d]["acc_delta_vs_float32"] = out["per_dtype"][d]["large_test_acc_after_rkd"] - base
    return out


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, table, write_result

    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    proxy, classes, shape = 5000, 10, (28, 28, 1)
    large_kw = {}  # the default LargeCNN (width 32), the paper's "large" scale
    rows = bytes_table(proxy, classes, shape, large_kw)
    print(table(["protocol", "down B/device/round", "up B/device/round", "total", "vs fedavg_large", "reduction"],
                [[r["protocol"], r["down"], r["up"], r["total"], r["vs_fedavg_large"], r["reduction"]] for r in rows]))
    acc = accuracy_cost(quick)
    print()
    print(table(["logit wire dtype", "max abs logit err", "fused max abs dp", "fused KL vs f32", "argmax agree",
                 "large acc after rKD", "delta vs f32"],
                [[d, v["max_abs_logit_error"], v["fused_max_abs_prob_diff"], v["fused_kl_vs_float32"],
                  v["fused_argmax_agreement"], v["large_test_acc_after_rkd"], v["acc_delta_vs_float32"]]
                 for d, v in acc["per_dtype"].items()]))  # fmt: skip
    ratios = {f"bytes/{r['protocol']}/vs_fedavg_large": r["vs_fedavg_large"] for r in rows}
    ratios.update({f"acc/{d}/delta_vs_float32": v["acc_delta_vs_float32"] for d, v in acc["per_dtype"].items()})
    return write_result(NAME, out, quick=quick, params={"proxy": proxy, "classes": classes, "input": list(shape),
                        "small_arch": "cnn_small", "large": large_kw or "LargeCNN default (width 32)",
                        "accuracy_run": {k: acc[k] for k in ("dataset", "devices", "proxy")}},
                        raw={"bytes": rows, "accuracy": acc}, ratios=ratios,
                        notes=["frame bytes include the JSON header (~0.4-1 kB) and are exact codec output",
                               "accuracy run: 1-round, one KD pass; differences below ~0.5 pt are noise"],
                        started=started, load_start=load0)  # fmt: skip


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
