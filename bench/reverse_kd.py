"""Reverse KD throughput: proxy samples/s of the engine's `reverse_distill` on the large model,
vs plain supervised training (cross-entropy, same model, batch, optimizer, inputs) in the same run.

The ratio isolates what KD adds per sample (softmax/KL against soft targets, the tensor copies)
from the cost of the large model's forward/backward, which both share. Inputs are random
28x28x1 tensors: throughput does not depend on pixel values. `koala bench reverse_kd --device
cuda` runs both on a GPU (the engine's reverse_distill runs wherever the large model lives);
GPU timings synchronise the device before the clock stops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "reverse_kd"


def supervised(large: Any, x: np.ndarray, y: np.ndarray, batch: int, epochs: int, lr: float = 1e-3, seed: int = 0) -> None:
    """Baseline: the same loop shape as reverse_distill, with hard labels and cross-entropy — the
    FedAvg-large device step of the engine, so the baseline is code the product runs."""
    from server_app.engine.strategies.fedavg_large import train_large_locally

    train_large_locally(large, x, y, epochs=epochs, lr=lr, batch=batch, seed=seed)


def measure(width: int, proxy: int, epochs: int, batch: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    from server_app.engine.distill import reverse_distill
    from server_app.engine.fusion import softmax
    from server_app.models.large import build_large, param_count, resolve_device

    dev = resolve_device(device)

    def sync() -> None:  # CUDA kernels are asynchronous: stop the clock only when they are done
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.random((proxy, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, proxy).astype(np.int64)
    q = softmax(rng.standard_normal((proxy, 10)) * 2).astype(np.float32)
    warm = build_large((28, 28, 1), 10, seed=0, width=width).to(dev)
    reverse_distill(warm, x[: batch * 2], q[: batch * 2], epochs=1, batch=batch)  # warm-up: allocator, kernels
    supervised(warm, x[: batch * 2], y[: batch * 2], batch, 1)
    sync()
    out: dict[str, Any] = {"width": width, "params": param_count(warm), "proxy": proxy, "epochs": epochs,
                           "batch": batch, "threads": threads, "device": str(dev),
                           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}  # fmt: skip
    order = [("supervised", 0), ("reverse_kd", 0), ("supervised", 1), ("reverse_kd", 1)]  # interleaved: load drift
    times: dict[str, list[float]] = {"supervised": [], "reverse_kd": []}
    for kind, rep in order:
        m = build_large((28, 28, 1), 10, seed=rep, width=width).to(dev)
        sync()
        t0 = time.perf_counter()
        if kind == "supervised":
            supervised(m, x, y, batch, epochs)
        else:
            reverse_distill(m, x, q, T=1.0, epochs=epochs, batch=batch)
        sync()
        times[kind].append(time.perf_counter() - t0)
    for kind, ts in times.items():
        out[f"{kind}_s"] = ts
        out[f"{kind}_samples_per_s"] = proxy * epochs / min(ts)
    out["reverse_kd_over_supervised"] = out["reverse_kd_samples_per_s"] / out["supervised_samples_per_s"]
    return out


def run(quick: bool = False, out: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, table, write_result

    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    threads = max(1, min(2, os.cpu_count() or 1))
    configs = [(16, 512, 1)] if quick else [(16, 2000, 1), (32, 1000, 1)]
    if device != "cpu" and not quick:  # a GPU has room for the bigger proxy and the default width
        configs = [(16, 5000, 1), (32, 5000, 1), (64, 5000, 1)]
    rows_raw = [measure(w, p, e, 256, threads, device) for w, p, e in configs]
    print(table(["device", "large width", "params", "proxy", "supervised samples/s", "reverse KD samples/s", "rKD/supervised",
                 "rKD s per 5k-proxy epoch"],
                [[r["device_name"], r["width"], r["params"], r["proxy"], r["supervised_samples_per_s"], r["reverse_kd_samples_per_s"],
                  r["reverse_kd_over_supervised"], 5000 / r["reverse_kd_samples_per_s"]] for r in rows_raw]))  # fmt: skip
    name = NAME if device == "cpu" else f"{NAME}_{device.replace(':', '')}"
    notes = [] if device != "cpu" else ["CPU run; `koala bench reverse_kd --device cuda` measures a GPU where there is one"]
    return write_result(name, out, quick=quick, params={"configs": configs, "batch": 256, "threads": threads,
                        "device": device, "input": [28, 28, 1]}, raw=rows_raw,
                        ratios={f"w{r['width']}/reverse_kd_over_supervised": r["reverse_kd_over_supervised"] for r in rows_raw},
                        notes=notes,
                        started=started, load_start=load0)  # fmt: skip


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv, device=next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--device=")), "cpu"))
