"""The experiment that answers the paper: Fashion-MNIST, 20 devices, Dirichlet(0.5), disjoint 5k
proxy, every method on the same partition / proxy / initial large model.

2 shared CPU cores: methods run in parts (separate processes, 1 torch thread each), then
`--merge` writes bench/results/koala_fmnist.json (+ _curves.json) and koala_fmnist.png.

  nice -n 10 .venv/bin/python bench/koala_experiment.py --part main &
  nice -n 10 .venv/bin/python bench/koala_experiment.py --part hetero &
  .venv/bin/python bench/koala_experiment.py --merge
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PARTS_DIR = RESULTS / "koala_fmnist_parts"

BASE = {
    "dataset": "fashion-mnist", "devices": 20, "alpha": 0.5, "proxy_size": 5000, "train_size": 6000,
    "rounds": 5, "homo_arch": "cnn_small", "hetero_archs": ["mlp_tiny", "cnn_small", "mobilenet_tiny"],
    "seed": 0, "temperature": 1.0, "local_epochs": 1, "lr": 1e-3, "rkd_epochs": 2, "proxy_per_round": 1000, "fkd_epochs": 1,
    "large": {"width": 16}, "eval_samples": 2000, "small_eval_samples": 500, "torch_threads": 1,
}  # fmt: skip

PARTS = {
    "large": ["fedavg_large"],  # does not use the proxy set
    "a": ["koala_homo", "koala_homo_logits", "koala_hetero", "fedavg_small", "local_only"],
    # b: the other fusion / reverse-KD variants, then gap-closing ideas, one change at a time from
    # koala_homo_logits (naive ensemble distillation)
    "b": [
        "koala_hetero_mean",
        {"name": "homo_logits+class_aware", "preset": "koala_homo_logits", "options": {"fusion": "class_aware"}},
        "koala_hetero_group",
        {"name": "homo_logits+T3", "preset": "koala_homo_logits", "options": {"temperature": 3.0}},
        {"name": "homo_logits+rkd4", "preset": "koala_homo_logits", "options": {"rkd_epochs": 4}},
        {"name": "homo_logits+post_kd", "preset": "koala_homo_logits", "options": {"post_kd_epochs": 1}},
    ],
}


def run_part(part: str) -> None:
    from server_app.sim import load_config, run_experiment

    cfg = load_config(None, **{**BASE, "methods": PARTS[part], "out": str(PARTS_DIR / part)})
    run_experiment(cfg, progress=True, write=True)


def merge() -> None:
    from server_app.sim.plot import plot_curves
    from server_app.sim.runner import add_reductions

    rows, curves = [], {}
    for part in PARTS:
        d = PARTS_DIR / part
        if (d / "results.json").exists():
            rows += json.loads((d / "results.json").read_text())
            curves.update(json.loads((d / "curves.json").read_text())["curves"])
    add_reductions(rows)
    (RESULTS / "koala_fmnist.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "koala_fmnist_curves.json").write_text(json.dumps({"config": BASE, "curves": curves}, indent=1))
    plot_curves(curves, RESULTS / "koala_fmnist.png", "Fashion-MNIST, 20 devices, Dirichlet 0.5, 5k proxy")
    for r in rows:
        print(f"{r['method']:28s} large={r['large_test_acc']} small={r['small_test_acc_mean']} wall={r['wall_s']:.0f}s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=sorted(PARTS))
    ap.add_argument("--merge", action="store_true")
    a = ap.parse_args()
    if a.part:
        run_part(a.part)
    if a.merge:
        merge()
