"""The experiment that answers the paper: Fashion-MNIST, 20 devices, Dirichlet(0.5), disjoint 5k
proxy, every method on the same partition / proxy / initial large model.

2 shared CPU cores: methods run in parts (separate processes, 1 torch thread each), then
`--merge` writes research/results/koala_fmnist.json (+ _curves.json) and koala_fmnist.png.

  nice -n 10 .venv/bin/python research/koala_experiment.py --part main &
  nice -n 10 .venv/bin/python research/koala_experiment.py --part hetero &
  .venv/bin/python research/koala_experiment.py --merge
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
    "logits_dtype": "float16",  # what every part before 2026-12-05 uploaded (the policy default is now int8)
}  # fmt: skip

PARTS = {
    "large": ["fedavg_large"],  # does not use the proxy set
    "a": ["koala_homo", "koala_homo_logits", "koala_hetero_class_aware", "fedavg_small", "local_only"],
    # b: the other fusion / reverse-KD variants, then gap-closing ideas, one change at a time from
    # koala_homo_logits (naive ensemble distillation)
    "b": [
        "koala_hetero_mean",
        {"name": "homo_logits+class_aware", "preset": "koala_homo_logits", "policy": {"fusion": "class_aware"}},
        "koala_hetero_group",
        {"name": "homo_logits+T3", "preset": "koala_homo_logits", "policy": {"temperature": 3.0}},
        {"name": "homo_logits+rkd4", "preset": "koala_homo_logits", "policy": {"rkd_epochs": 4}},
        {"name": "homo_logits+post_kd", "preset": "koala_homo_logits", "policy": {"post_fkd_epochs": 1}},
    ],
    # compute-matched devices: a small model costs ~50x fewer FLOPs than the large one, so 5 local
    # epochs still cost devices ~10x less than FedAvg-large's single epoch
    "c": [
        {"name": "homo_logits+class_aware+local5", "preset": "koala_homo_logits",
         "policy": {"fusion": "class_aware", "local_epochs": 5}},
        {"name": "koala_homo+local5", "preset": "koala_homo", "policy": {"local_epochs": 5}},
    ],
    "d": [
        {"name": "koala_homo+local5+rkd4", "preset": "koala_homo", "policy": {"local_epochs": 5, "rkd_epochs": 4}},
        {"name": "koala_hetero_class_aware+local5", "preset": "koala_hetero_class_aware", "policy": {"local_epochs": 5}},
    ],
    # the paper-faithful settings (same local epochs as FedAvg-large) and the small baseline, for longer runs
    "same": ["koala_homo", "koala_homo_logits", "fedavg_small"],
    # the rest of "same" and "best", split off so an interrupted long run resumes without redoing
    # the methods it finished (merge reads every part dir)
    "same_rest": ["koala_homo_logits", "fedavg_small"],
    "best_hetero": [
        {"name": "koala_hetero_mean+local5+rkd4", "preset": "koala_hetero_mean",
         "policy": {"local_epochs": 5, "rkd_epochs": 4}},
    ],
    # a candidate for the heterogeneous gap: confidence (entropy) weighted fusion, compute-matched
    "hetero_entropy": [
        {"name": "koala_hetero_entropy+local5+rkd4", "preset": "koala_hetero_entropy",  # the hetero default until 2026-12-04
         "policy": {"local_epochs": 5, "rkd_epochs": 4}},
    ],
    # class-aware fusion (the hetero default since 2026-12-04), paired with hetero_entropy
    "hetero_class_aware": [
        {"name": "koala_hetero_class_aware+local5+rkd4", "preset": "koala_hetero_class_aware",
         "policy": {"local_epochs": 5, "rkd_epochs": 4}},
    ],
    # the heterogeneous fleet as shipped since 2026-12-05: mobilenet_micro third, int8 logits up
    "hetero_shipped": [
        {"name": "koala_hetero_shipped+local5+rkd4", "preset": "koala_hetero", "archs": "policy",
         "policy": {"archs": ["mlp_tiny", "cnn_small", "mobilenet_micro"], "fusion": "class_aware",
                    "logits_dtype": "int8", "local_epochs": 5, "rkd_epochs": 4}},
    ],
    # the best settings of a-d, for longer runs (`--rounds 10`)
    "best": [
        {"name": "koala_homo+local5+rkd4", "preset": "koala_homo", "policy": {"local_epochs": 5, "rkd_epochs": 4}},
        {"name": "koala_hetero_mean+local5+rkd4", "preset": "koala_hetero_mean",
         "policy": {"local_epochs": 5, "rkd_epochs": 4}},
    ],
}


def _part_dir(part: str, rounds: int | None, seed: int | None = None) -> Path:
    """Runs longer than BASE's rounds (or with another seed) keep their own parts so every table
    can be rebuilt."""
    name = part if rounds is None else f"{part}_r{rounds}"
    return PARTS_DIR / (name if not seed else f"{name}_s{seed}")


def _config(rounds: int | None, seed: int | None) -> dict:
    return {**BASE, **({"rounds": rounds} if rounds else {}), **({"seed": seed} if seed else {})}


def run_part(part: str, rounds: int | None = None, seed: int | None = None) -> None:
    from server_app.sim import load_config, run_experiment

    cfg = load_config(None, **{**_config(rounds, seed), "methods": PARTS[part], "out": str(_part_dir(part, rounds, seed))})
    run_experiment(cfg, progress=True, write=True)


def seeds_summary(rounds: int | None, seeds: list[int]) -> None:
    """Mean and spread over seeds of every method run with all of them (seed 0 = the main table):
    writes koala_fmnist[_rN]_seeds.json and prints a Markdown table."""
    import statistics

    per: dict[str, list[float]] = {}
    for seed in seeds:
        for part in PARTS:
            f = _part_dir(part, rounds, seed) / "results.json"
            if f.exists():
                for r in json.loads(f.read_text()):
                    if r["large_test_acc"] is not None:
                        per.setdefault(r["method"], []).append(r["large_test_acc"])
    rows = []
    for method, accs in per.items():
        if len(accs) == len(seeds):
            rows.append({"method": method, "seeds": seeds, "large_test_acc": accs, "mean": statistics.mean(accs),
                         "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0})  # fmt: skip
    base = next((r for r in rows if r["method"] == "fedavg_large"), None)
    for r in rows:
        r["gap_vs_fedavg_large"] = None if base is None else r["mean"] - base["mean"]
        r["per_seed_gap"] = None if base is None else [a - b for a, b in zip(r["large_test_acc"], base["large_test_acc"], strict=True)]
    stem = "koala_fmnist" if rounds is None else f"koala_fmnist_r{rounds}"
    (RESULTS / f"{stem}_seeds.json").write_text(json.dumps(rows, indent=1))
    print("| method | seeds | large acc per seed | mean ± stdev | gap vs FedAvg-large (mean) | gap per seed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gap = "-" if r["gap_vs_fedavg_large"] is None else f"{r['gap_vs_fedavg_large'] * 100:+.1f} pt"
        per_seed = "-" if r["per_seed_gap"] is None else ", ".join(f"{g * 100:+.1f}" for g in r["per_seed_gap"])
        print(f"| {r['method']} | {len(r['seeds'])} | {', '.join(f'{a:.3f}' for a in r['large_test_acc'])} | "
              f"{r['mean']:.3f} ± {r['stdev']:.3f} | {gap} | {per_seed} |")


def merge(rounds: int | None = None) -> None:
    from server_app.sim.plot import plot_curves
    from server_app.sim.runner import add_reductions

    stem = "koala_fmnist" if rounds is None else f"koala_fmnist_r{rounds}"
    rows, curves = [], {}
    for part in PARTS:
        d = _part_dir(part, rounds)
        if (d / "results.json").exists():
            rows += json.loads((d / "results.json").read_text())
            curves.update(json.loads((d / "curves.json").read_text())["curves"])
    add_reductions(rows)
    config = BASE if rounds is None else {**BASE, "rounds": rounds}
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{stem}_curves.json").write_text(json.dumps({"config": config, "curves": curves}, indent=1))
    plot_curves(curves, RESULTS / f"{stem}.png", "Fashion-MNIST, 20 devices, Dirichlet 0.5, 5k proxy")
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print("| method | mode | large acc | gap vs FedAvg-large | small acc (dev mean) | storage red. | FLOPs red. | up B/dev/round | down B/dev/round | uplink red. | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['mode']} | {f(r['large_test_acc'])} | {f(r.get('large_acc_gap_vs_fedavg_large'))} | "
              f"{f(r['small_test_acc_mean'])} | {f(r.get('storage_reduction_vs_fedavg_large'))} | "
              f"{f(r.get('flops_reduction_vs_fedavg_large'))} | {r['bytes_up_per_device_round']:.0f} | "
              f"{r['bytes_down_per_device_round']:.0f} | {f(r.get('uplink_reduction_vs_fedavg_large'))} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=sorted(PARTS))
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="override BASE rounds (own parts dir and output stem)")
    ap.add_argument("--seed", type=int, default=None, help="override BASE seed (partition, init, sampling; own parts dir)")
    ap.add_argument("--seeds-summary", default=None, help="comma-separated seeds, e.g. 0,1,2: mean/spread table")
    a = ap.parse_args()
    if a.part:
        run_part(a.part, a.rounds, a.seed)
    if a.seeds_summary:
        seeds_summary(a.rounds, [int(x) for x in a.seeds_summary.split(",")])
    if a.merge:
        merge(a.rounds)
