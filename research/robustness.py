"""Robust fusion: the clean-accuracy cost (all devices honest) and the gain under attack, on digits.

Setup (one seed per repeat): digits (8x8x1), 10 devices, Dirichlet(alpha) label skew (alpha None =
IID), a 400-sample proxy held out of training; every device trains its own LiteRT `mlp_tiny` on its
private data (`epochs` epochs) and sends its proxy logits. For each fusion rule we measure
- label_acc: accuracy of the fused soft label's argmax against the proxy's true labels;
- large_acc: test accuracy of a small LargeCNN reverse-distilled on (proxy, fused labels) only —
  what the label quality costs downstream.
Attacks (replace the first `f` devices' logits): "one_hot" (class 3 at 1e30), "random" (N(0,1)x1e30),
and the attacker claims 10^6 samples (so "weighted" hands it the vote; "weighted_capped" is
"weighted" on counts capped at 2x their median, robust.cap_sample_counts).

    python -m research.robustness [--quick]     -> research/results/robustness[.quick].json
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "robustness"
RULES = ("mean", "weighted", "weighted_capped", "median", "trimmed_mean", "agreement")


def _device_logits(ds: Any, split: Any, epochs: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    from device_firmware_py.runtime.small_model import SmallModel

    px = ds.x_train[split.proxy_indices]
    out, ns = [], []
    for i, idx in enumerate(split.device_indices):
        m = SmallModel("mlp_tiny_8x8x1", num_threads=1)
        m.train(ds.x_train[idx], ds.y_train[idx], epochs=epochs, lr=3e-3, seed=seed * 100 + i)
        out.append(m.logits(px))
        ns.append(len(idx))
    return out, ns


def _large_acc(ds: Any, px: np.ndarray, q: np.ndarray, seed: int, epochs: int) -> float:
    from server_app.engine.distill import reverse_distill
    from server_app.models.large import accuracy, build_large

    large = build_large(ds.input_shape, width=8, fc=64, seed=seed)
    reverse_distill(large, px, q, T=1.0, epochs=epochs, lr=2e-3, batch=64, seed=seed)
    return accuracy(large, ds.x_test, ds.y_test)


def measure(
    alpha: float | None, attackers: int, attack: str, seed: int, epochs: int, kd_epochs: int
) -> list[dict[str, Any]]:
    import torch

    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split
    from server_app.engine.fusion import fuse_logits
    from server_app.engine.robust import cap_sample_counts

    torch.set_num_threads(2)
    ds = load_dataset("digits", seed=seed)
    split = make_federated_split(ds.y_train, 10, 400, seed, alpha=alpha, min_samples=20)
    logits, ns = _device_logits(ds, split, epochs, seed)
    px, py = ds.x_train[split.proxy_indices], ds.y_train[split.proxy_indices]
    rng = np.random.default_rng(seed)
    P, C = logits[0].shape
    for i in range(attackers):
        logits[i] = np.eye(C)[np.full(P, 3)] * 1e30 if attack == "one_hot" else rng.normal(size=(P, C)) * 1e30
        ns[i] = 1_000_000
    rows = []
    for rule in RULES:
        if rule == "weighted_capped":  # "weighted" on counts capped at 2 x their median
            q = fuse_logits(logits, "weighted", num_samples=cap_sample_counts(ns))
        else:
            q = fuse_logits(logits, rule, num_samples=ns)
        rows.append({"alpha": alpha, "attackers": attackers, "attack": attack if attackers else "none", "seed": seed,
                     "rule": rule, "label_acc": float(np.mean(q.argmax(1) == py)),
                     "large_acc": _large_acc(ds, px, q, seed, kd_epochs)})  # fmt: skip
    return rows


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import table, write_result

    started, load0 = time.time(), os.getloadavg()
    out = out or Path(__file__).resolve().parent / "results"
    seeds = [0] if quick else [0, 1, 2]
    epochs, kd_epochs = (20, 20) if quick else (30, 30)
    scenarios = [(None, 0, "none"), (0.3, 0, "none"), (None, 1, "one_hot"), (0.3, 1, "one_hot"), (0.3, 1, "random"),
                 (0.3, 2, "one_hot")]  # fmt: skip
    if quick:
        scenarios = scenarios[:4]
    raw = [r for a, f, atk in scenarios for s in seeds for r in measure(a, f, atk, s, epochs, kd_epochs)]
    summary = []
    for a, f, atk in scenarios:
        for rule in RULES:
            rs = [
                r
                for r in raw
                if r["alpha"] == a and r["attackers"] == f and r["attack"] == atk and r["rule"] == rule
            ]
            summary.append({"alpha": a, "attackers": f, "attack": atk, "rule": rule,
                            "label_acc": float(np.mean([r["label_acc"] for r in rs])),
                            "large_acc": float(np.mean([r["large_acc"] for r in rs]))})  # fmt: skip
    print(table(["alpha", "attackers/10", "attack", "rule", "fused label acc", "large test acc"],
                [["iid" if s["alpha"] is None else s["alpha"], s["attackers"], s["attack"], s["rule"], s["label_acc"],
                  s["large_acc"]] for s in summary]))  # fmt: skip
    ratios = {f"{'iid' if s['alpha'] is None else s['alpha']}/{s['attackers']}x{s['attack']}/{s['rule']}/label_acc": s["label_acc"]
              for s in summary}  # fmt: skip
    return write_result(NAME, out, quick=quick, params={"dataset": "digits", "devices": 10, "proxy": 400, "arch": "mlp_tiny",
                        "device_epochs": epochs, "kd_epochs": kd_epochs, "seeds": seeds, "scenarios": scenarios},
                        raw={"rows": raw, "summary": summary}, ratios=ratios,
                        notes=["mean of seeds; label_acc on the 400 proxy samples, large_acc on the 450 digits test images"],
                        started=started, load_start=load0)  # fmt: skip


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
