"""KOALA vs FedAvg-large at full data scale (issue 15): Fashion-MNIST, all 55,000 non-proxy
training images over 20 devices, Dirichlet alpha, 10 rounds, width-16 large model, a disjoint
5,000-image proxy set; every round of every curve scored on the full 10,000-image test set
(large model and small models alike, so "above its own teacher" compares like with like).

One process per (method, alpha, seed), each written to its own file under
research/results/koala_fmnist_full_parts/, so partial runs accumulate across sessions: a finished
(method, alpha, seed) is never rerun. `--merge` builds research/results/koala_fmnist_full.json
(`config` + `rows`: per method and alpha the final large-model accuracy per seed, mean, stdev,
gap to FedAvg-large, teacher accuracy, and the storage / FLOPs / uplink reductions vs FedAvg-large
computed as `server_app.sim.runner.add_reductions` does) and koala_fmnist_full.png / _curves.json
(mean curve over the seeds run of the baselines and KOALA as shipped, PLOT_METHODS; every run's
own curve stays in its part file).

2 shared CPU cores, 1 torch thread per process, at most 2 at once:

  nice -n 19 .venv/bin/python research/koala_full.py --alpha 0.5 --seeds 0,1,2 --methods fedavg_large &
  nice -n 19 .venv/bin/python research/koala_full.py --alpha 0.5 --seeds 0,1,2 --methods koala_homo &
  .venv/bin/python research/koala_full.py --merge
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python research/koala_full.py`: the plugin strategies import as research.*
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
PARTS_DIR = RESULTS / "koala_fmnist_full_parts"
STEM = "koala_fmnist_full"

# The experiment. train_size None: every training image not in the proxy set (55,000).
# eval_samples None: the whole test set every round; small_eval_samples 10,000: the same for
# the small models (device mean and the global small model, KOALA's homo teacher).
FULL: dict[str, Any] = {
    "dataset": "fashion-mnist", "devices": 20, "proxy_size": 5000, "train_size": None, "rounds": 10,
    "homo_arch": "cnn_small", "hetero_archs": ["mlp_tiny", "cnn_small", "mobilenet_tiny"],
    "eval_samples": None, "small_eval_samples": 10000, "torch_threads": 1,
}  # fmt: skip
# The base policy every method starts from (baselines: 1 local epoch, as in koala_experiment.py's
# BASE); each KOALA method states every KOALA knob it uses, so a row never depends on the
# KoalaPolicy defaults of the day.
# logits_dtype float16: what every run before 2026-12-05 uploaded (the policy default is now int8)
BASE_POLICY: dict[str, Any] = {"temperature": 1.0, "lr": 1e-3, "local_epochs": 1, "large": {"width": 16},
                               "logits_dtype": "float16"}
# compute-matched KOALA (README): 5 local epochs on the small model still cost devices ~10x less
# than FedAvg-large's single epoch; the lead: all 5,000 proxy images every round
KOALA_LEAD = {"local_epochs": 5, "fkd_epochs": 1, "rkd_epochs": 4, "proxy_per_round": None}

HETERO_MICRO = ["mlp_tiny", "cnn_small", "mobilenet_micro"]
_PLUS = {"strategy": "research.koala_candidates:KoalaHomoPlus", "teacher": "avg_model"}
METHODS: dict[str, dict[str, Any]] = {
    "fedavg_large": {"name": "fedavg_large", "preset": "fedavg_large"},
    "fedavg_small+local5": {"name": "fedavg_small+local5", "preset": "fedavg_small", "policy": {"local_epochs": 5}},
    # the lead (policy defaults otherwise: avg_model teacher)
    "koala_homo": {"name": "koala_homo", "preset": "koala_homo", "policy": dict(KOALA_LEAD)},
    # entropy fusion (the hetero default until 2026-12-04; pinned so the row keeps its meaning)
    "koala_hetero": {"name": "koala_hetero", "preset": "koala_hetero", "policy": {**KOALA_LEAD, "fusion": "entropy"}},
    # strong label skew: trust each device's logits on the classes its histogram says it has seen
    "koala_hetero+class_aware": {"name": "koala_hetero+class_aware", "preset": "koala_hetero",
                                 "policy": {**KOALA_LEAD, "fusion": "class_aware"}},
    # the product's heterogeneous default since 2026-12-05: mobilenet_micro in place of mobilenet_tiny
    # (FLOPs goal) and int8 logits on the uplink (uplink goal); class-aware fusion as above
    "koala_hetero+micro+int8": {"name": "koala_hetero+micro+int8", "preset": "koala_hetero", "archs": "policy",
                                "policy": {**KOALA_LEAD, "fusion": "class_aware", "archs": HETERO_MICRO,
                                           "logits_dtype": "int8"}},
    # class-aware fusion trusts device d on class c by its share of class-c data, but an expert that
    # saw one or two classes answers "mine" for every image; forward KD after local training gives
    # it back the rest of the large model's view before it uploads (one more proxy pass on device)
    "koala_hetero+micro+int8+post1": {"name": "koala_hetero+micro+int8+post1", "preset": "koala_hetero",
                                      "archs": "policy",
                                      "policy": {**KOALA_LEAD, "fusion": "class_aware", "archs": HETERO_MICRO,
                                                 "logits_dtype": "int8", "post_fkd_epochs": 1}},
    # a temporal ensemble of the fused soft labels (research/koala_candidates.py): the alpha 0.1 curves swing
    "koala_hetero+micro+int8+ema0.5": {"name": "koala_hetero+micro+int8+ema0.5", "archs": "policy",
                                       "policy": {**KOALA_LEAD, "fusion": "class_aware", "archs": HETERO_MICRO,
                                                  "logits_dtype": "int8", "teacher": "device_logits",
                                                  "strategy": "research.koala_candidates:KoalaHeteroPlus",
                                                  "plugin_options": {"teacher_ema": 0.5}}},
    "koala_homo+post1": {"name": "koala_homo+post1", "preset": "koala_homo",
                         "policy": {**KOALA_LEAD, "post_fkd_epochs": 1}},
    # the heterogeneous fleet on float16, to price the int8 uplink at full scale
    "koala_hetero+micro+f16": {"name": "koala_hetero+micro+f16", "preset": "koala_hetero", "archs": "policy",
                               "policy": {**KOALA_LEAD, "fusion": "class_aware", "archs": HETERO_MICRO,
                                          "logits_dtype": "float16"}},
    # gap-closing candidates, one change each from koala_homo
    # the paper's hetero path: per-architecture intra-group FedAvg, each group's averaged model a
    # teacher (devices get their group's average back), fused per class from the groups' histograms
    "koala_hetero+avg+class_aware": {"name": "koala_hetero+avg+class_aware", "preset": "koala_hetero",
                                     "policy": {**KOALA_LEAD, "teacher": "avg_model", "fusion": "class_aware"}},
    "koala_hetero+avg": {"name": "koala_hetero+avg", "preset": "koala_hetero",
                         "policy": {**KOALA_LEAD, "teacher": "avg_model"}},
    # same server compute, twice the reverse-KD steps: the best recipe of research/rkd_recipes.py in
    # isolation (+0.7 pt), not in this loop (README Results)
    "koala_homo+b128": {"name": "koala_homo+b128", "preset": "koala_homo", "policy": {**KOALA_LEAD, "rkd_batch": 128}},
    "koala_hetero+class_aware+b128": {"name": "koala_hetero+class_aware+b128", "preset": "koala_hetero",
                                      "policy": {**KOALA_LEAD, "fusion": "class_aware", "rkd_batch": 128}},
    # the opposite of b128 (which lost 4.6 pt here): fit the noisy fused teacher less each round
    "koala_hetero+class_aware+rkd2": {"name": "koala_hetero+class_aware+rkd2", "preset": "koala_hetero",
                                      "policy": {**KOALA_LEAD, "fusion": "class_aware", "rkd_epochs": 2}},
    "koala_homo+rkd12": {"name": "koala_homo+rkd12", "preset": "koala_homo",
                         "policy": {**KOALA_LEAD, "rkd_epochs": 12}},
    "koala_homo+T3": {"name": "koala_homo+T3", "preset": "koala_homo", "policy": {**KOALA_LEAD, "temperature": 3.0}},
    # FedDF-style: every device's proxy logits is a teacher, sample-weighted mean (devices keep their own models)
    "koala_homo_logits": {"name": "koala_homo_logits", "preset": "koala_homo_logits", "policy": dict(KOALA_LEAD)},
    # research/koala_candidates.py (plugin): averaged-model teacher + the ensemble of the uploaded device
    # models, scored server-side (uplink unchanged); or a temporal ensemble of the teachers over rounds
    "koala_homo+ens1": {"name": "koala_homo+ens1", "policy": {**KOALA_LEAD, **_PLUS, "plugin_options": {"device_ensemble": 1.0}}},
    # the same ensemble fused class-aware (each device model votes on the classes it holds): the
    # fusion that made the hetero fleet's consensus beat each of its models (uplink unchanged)
    "koala_homo+ens1ca": {"name": "koala_homo+ens1ca", "policy": {**KOALA_LEAD, **_PLUS, "plugin_options": {
        "device_ensemble": 1.0, "ensemble_fusion": "class_aware"}}},
    # consistent-view reverse KD: a fresh shifted/flipped view of the proxy every rKD epoch, teacher on the same view
    "koala_homo+aug2": {"name": "koala_homo+aug2", "policy": {**KOALA_LEAD, **_PLUS, "plugin_options": {"rkd_augment": 2}}},
    "koala_homo+ema0.5": {"name": "koala_homo+ema0.5", "policy": {**KOALA_LEAD, **_PLUS, "plugin_options": {"teacher_ema": 0.5}}},
}  # fmt: skip
BASELINE = "fedavg_large"
# the plot's curves: the baselines and KOALA as shipped (one-seed candidates stay in the JSON)
PLOT_METHODS = ("fedavg_large", "fedavg_small+local5", "koala_homo", "koala_hetero+micro+int8")


def _akey(alpha: float | None) -> str:
    return "iid" if alpha is None else f"a{alpha:g}"


def part_path(method: str, alpha: float | None, seed: int, train_size: int | None = None) -> Path:
    """The full-scale runs under <alpha>/; the data-size curve's smaller runs under size/<alpha>_n<size>/
    (one level deeper, so the main table's merge never mixes them in)."""
    sub = _akey(alpha) if train_size is None else f"size/{_akey(alpha)}_n{train_size}"
    return PARTS_DIR / sub / f"{method.replace('+', '_')}_s{seed}.json"


def run_config(method: str, alpha: float | None, seed: int, train_size: int | None = None, out: Path | None = None):
    """The SimConfig of one (method, alpha, seed[, device images]): FULL + the method + BASE_POLICY.
    research/parity_full.py builds the deployed run's policy and data layout from the same config."""
    from server_app.sim import load_config

    cfg = load_config(None, **{**FULL, "alpha": alpha, "train_size": train_size, "methods": [METHODS[method]],
                               "out": str(out) if out else None}, policy={**BASE_POLICY, "seed": seed})  # fmt: skip
    if alpha is None:
        cfg.alpha = None
    return cfg


def run_one(method: str, alpha: float | None, seed: int, progress: bool = True,
            train_size: int | None = None) -> dict[str, Any]:
    """One (method, alpha, seed[, device images]), written to its part file (skipped if that exists)."""
    out = part_path(method, alpha, seed, train_size)
    if out.exists():
        print(f"skip {out.relative_to(RESULTS)} (done)")
        return json.loads(out.read_text())
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split
    from server_app.sim.runner import _jsonable, run_method

    cfg = run_config(method, alpha, seed, train_size, out=out.parent)
    ds = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    split = make_federated_split(ds.y_train, cfg.devices, cfg.proxy_size, cfg.seed, cfg.alpha, cfg.min_samples, cfg.train_size)
    t0 = time.time()
    res = run_method(cfg, cfg.method_specs()[0], ds, split, progress)
    doc = {"config": cfg.to_dict(), "method": method, "alpha": alpha, "seed": seed,
           "partition": {"device_sizes": [int(len(i)) for i in split.device_indices], "proxy": int(len(split.proxy_indices))},
           "row": _jsonable(res["row"]), "curve": _jsonable(res["curve"]), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "wall_s": time.time() - t0}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)  # atomic: a killed run leaves no half file
    print(f"{method} alpha={alpha} seed={seed}: large {doc['row']['large_test_acc']} teacher {_teacher_acc(doc)} "
          f"({doc['wall_s']:.0f} s) -> {out.relative_to(RESULTS)}")  # fmt: skip
    return doc


def _teacher_acc(doc: dict[str, Any], round_id: int = -1) -> float | None:
    """The global small model's test accuracy after a round (default: the last) — homo KOALA's
    teacher; hetero: the best architecture's."""
    c = doc["curve"][round_id]
    g = c.get("global_small_test_acc")
    return max(g.values()) if g else c.get("small_test_acc_max")


SMALL_BASELINE = "fedavg_small+local5"


def _round_gaps(docs: list[dict[str, Any]], base: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Past the paper: the large model's gap to FedAvg-large after every round (same seed, same
    test set), its mean over the seeds, and per seed how many rounds KOALA was ahead (>=)."""
    mine = {d["seed"]: [c["large_test_acc"] for c in d["curve"]] for d in docs}
    theirs = {d["seed"]: [c["large_test_acc"] for c in d["curve"]] for d in base}
    gaps = {s: [100 * (x - y) for x, y in zip(mine[s], theirs[s], strict=False)] for s in seeds}
    n = min(len(g) for g in gaps.values())
    return {"round_gap_pt_mean": [round(statistics.mean(gaps[s][i] for s in seeds), 2) for i in range(n)],
            "rounds_ahead": {str(s): sum(g >= 0 for g in gaps[s]) for s in seeds}}  # fmt: skip


def _above_own_teachers(row: dict[str, Any], small_docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's per-run checks, per seed: the large model above its own teacher (homo: the
    global small model; hetero: the best device or group model) and above FedAvg-small's global
    small model (same seed), each as the margin in points (positive = above)."""
    small = {d["seed"]: _teacher_acc(d) for d in small_docs}
    acc = dict(zip(row["seeds"], row["large_test_acc"], strict=True))
    teach = dict(zip(row["seeds"], row["teacher_test_acc"], strict=True))
    return {"vs_teacher_pt": {str(s): round(100 * (acc[s] - teach[s]), 2) for s in row["seeds"] if teach[s] is not None},
            "vs_fedavg_small_pt": {str(s): round(100 * (acc[s] - small[s]), 2) for s in row["seeds"] if small.get(s)}}  # fmt: skip


def _parts() -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(PARTS_DIR.glob("*/*.json"))]


def merge() -> dict[str, Any]:
    from server_app.sim.runner import add_reductions

    docs = _parts()
    by: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for d in docs:
        by.setdefault((d["alpha"], d["method"]), []).append(d)
    rows, curves = [], {}
    order = list(METHODS)
    for (alpha, method), ds in sorted(by.items(), key=lambda kv: (str(kv[0][0]), order.index(kv[0][1]) if kv[0][1] in order else 99)):
        ds.sort(key=lambda d: d["seed"])
        accs = [d["row"]["large_test_acc"] for d in ds]
        r0 = ds[0]["row"]
        row = {
            "method": method, "alpha": alpha, "mode": r0["mode"], "strategy": r0["strategy"], "policy": r0["policy"],
            "archs": r0["archs"], "seeds": [d["seed"] for d in ds],
            "large_test_acc": accs if accs[0] is not None else None,
            "mean": statistics.mean(accs) if accs[0] is not None else None,
            "stdev": statistics.stdev(accs) if len(accs) > 1 and accs[0] is not None else 0.0,
            "teacher_test_acc": [_teacher_acc(d) for d in ds],
            "small_test_acc_mean": [d["row"]["small_test_acc_mean"] for d in ds],
            "teacher_agreement_last": [d["curve"][-1].get("teacher_agreement") for d in ds],
            # resource numbers do not depend on the seed: the first seed's
            **{k: r0[k] for k in ("device_param_count", "device_param_bytes", "device_train_flops_per_sample",
                                  "large_param_bytes", "large_train_flops_per_sample", "bytes_up_per_device_round",
                                  "bytes_down_per_device_round")},
            "wall_s": [round(d["row"]["wall_s"]) for d in ds],
        }  # fmt: skip
        rows.append(row)
        # mean curve over the seeds run
        n = min(len(d["curve"]) for d in ds)
        key = "large_test_acc" if row["large_test_acc"] is not None else "small_test_acc_mean"
        if method not in PLOT_METHODS:
            continue
        curves[f"a{alpha} {method} ({len(ds)} seeds)"] = [
            {"round": i, key: statistics.mean(d["curve"][i][key] for d in ds),
             **({"teacher_test_acc": statistics.mean(_teacher_acc(d, i) for d in ds)} if _teacher_acc(ds[0], i) else {})}
            for i in range(n)
        ]  # fmt: skip
    for alpha in sorted({r["alpha"] for r in rows}, key=str):
        group = [{**r, "large_test_acc": r["mean"]} for r in rows if r["alpha"] == alpha]
        add_reductions(group)  # same formula as the r10 table; accuracy gap on the means
        base = next((r for r in rows if r["alpha"] == alpha and r["method"] == BASELINE), None)
        for r, g in zip([r for r in rows if r["alpha"] == alpha], group, strict=True):
            for k in ("storage_reduction_vs_fedavg_large", "flops_reduction_vs_fedavg_large", "uplink_reduction_vs_fedavg_large"):
                r[k] = g.get(k)
            r["gap_vs_fedavg_large"] = None
            r["per_seed_gap"] = None
            if base is not None and r["mean"] is not None:
                common = [s for s in r["seeds"] if s in base["seeds"]]
                a = {s: v for s, v in zip(r["seeds"], r["large_test_acc"], strict=True)}
                b = {s: v for s, v in zip(base["seeds"], base["large_test_acc"], strict=True)}
                if common:  # the gap on the seeds both ran (same partition and init per seed)
                    r["gap_vs_fedavg_large"] = statistics.mean(a[s] - b[s] for s in common)
                    r["per_seed_gap"] = {str(s): a[s] - b[s] for s in common}
                    r.update(_round_gaps(by[(alpha, r["method"])], by[(alpha, BASELINE)], common))
            if r["mean"] is not None and r["mode"] != "baseline":
                r.update(_above_own_teachers(r, by.get((alpha, SMALL_BASELINE), [])))
    config = {**FULL, "train_size": (docs[0]["partition"] and sum(docs[0]["partition"]["device_sizes"])) if docs else None,
              "train_size_cap": FULL["train_size"], "alpha": sorted({r["alpha"] for r in rows}, key=str),
              "seeds": sorted({s for r in rows for s in r["seeds"]}), "base_policy": BASE_POLICY,
              "methods": {m: METHODS[m] for m in {r["method"] for r in rows} if m in METHODS},
              "test_set": "full 10,000-image Fashion-MNIST test set, every round"}  # fmt: skip
    doc = {"config": config, "rows": rows}
    (RESULTS / f"{STEM}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"{STEM}_curves.json").write_text(json.dumps({"config": config, "curves": curves}, indent=1))
    plot(curves, RESULTS / f"{STEM}.png")
    print_table(rows)
    return doc


SIZE_METHODS = ("fedavg_large", "koala_homo")


def merge_sizes() -> dict[str, Any]:
    """research/results/koala_fmnist_size_curve.json: KOALA homo minus FedAvg-large (final large-model
    accuracy, same alpha and seed) against the device images of the run: the size/ parts plus the
    full-scale parts (55,000). Prints the table."""
    rows = []
    for d in _parts() + [json.loads(f.read_text()) for f in sorted(PARTS_DIR.glob("size/*/*.json"))]:
        if d["method"] in SIZE_METHODS:
            rows.append({"method": d["method"], "alpha": d["alpha"], "seed": d["seed"],
                         "train_size": sum(d["partition"]["device_sizes"]), "large_test_acc": d["row"]["large_test_acc"],
                         "teacher_test_acc": _teacher_acc(d)})  # fmt: skip
    by = {(r["alpha"], r["seed"], r["train_size"], r["method"]): r for r in rows}
    points = []
    for (alpha, seed, n, m), r in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][2], kv[0][1])):
        base = by.get((alpha, seed, n, "fedavg_large"))
        if m == "koala_homo" and base is not None:
            points.append({"alpha": alpha, "seed": seed, "train_size": n, "koala_homo": r["large_test_acc"],
                           "fedavg_large": base["large_test_acc"], "gap_pt": 100 * (r["large_test_acc"] - base["large_test_acc"]),
                           "koala_teacher": r["teacher_test_acc"]})  # fmt: skip
    doc = {"config": {**FULL, "base_policy": BASE_POLICY, "methods": {m: METHODS[m] for m in SIZE_METHODS},
                      "note": "same alpha, seed, proxy and initial model per pair; device images = the partition's total"},
           "points": points}  # fmt: skip
    (RESULTS / "koala_fmnist_size_curve.json").write_text(json.dumps(doc, indent=1))
    for p in points:
        print(f"alpha {p['alpha']} seed {p['seed']} {p['train_size']:>6} images: FedAvg-large {p['fedavg_large']:.4f} "
              f"KOALA {p['koala_homo']:.4f} gap {p['gap_pt']:+.1f} pt (teacher {p['koala_teacher']})")
    return doc


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Large-model accuracy per round (solid), the global small model = KOALA's teacher (dashed,
    same colour), FedAvg-small (dotted); all on the full test set, mean over the seeds run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(curves.items()):
        xs = [r["round"] + 1 for r in rows]
        c = cmap(i % 10)
        if "large_test_acc" in rows[0]:
            ax.plot(xs, [r["large_test_acc"] for r in rows], "-o", color=c, label=f"{name}: large")
        else:
            ax.plot(xs, [r["small_test_acc_mean"] for r in rows], ":x", color=c, label=f"{name}: small (device mean)")
        if "teacher_test_acc" in rows[0]:
            ax.plot(xs, [r["teacher_test_acc"] for r in rows], "--", color=c, alpha=0.7, label=f"{name}: teacher (global small)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (full 10,000-image test set)")
    ax.set_title("Fashion-MNIST, 55k device images / 20 devices, 10 rounds (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print("| method | alpha | seeds | large acc per seed | mean ± stdev | gap vs FedAvg-large | teacher acc | "
          "storage red. | FLOPs red. | uplink red. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        accs = "-" if r["large_test_acc"] is None else ", ".join(f"{a:.3f}" for a in r["large_test_acc"])
        gap = "-" if r["gap_vs_fedavg_large"] is None else f"{r['gap_vs_fedavg_large'] * 100:+.1f} pt"
        teach = ", ".join(f(t) for t in r["teacher_test_acc"])
        print(f"| {r['method']} | {r['alpha']} | {','.join(map(str, r['seeds']))} | {accs} | {f(r['mean'])} ± "
              f"{f(r['stdev'])} | {gap} | {teach} | {f(r['storage_reduction_vs_fedavg_large'], 4)} | "
              f"{f(r['flops_reduction_vs_fedavg_large'], 4)} | {f(r['uplink_reduction_vs_fedavg_large'], 4)} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="", help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (<= 0: IID)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, run in order; finished ones are skipped")
    ap.add_argument("--merge", action="store_true", help="write koala_fmnist_full.json / _curves.json / .png")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--train-size", type=int, default=None,
                    help="device images of a data-size-curve run (default: all 55,000; results under size/)")
    ap.add_argument("--merge-sizes", action="store_true", help="write koala_fmnist_size_curve.json (gap vs device images)")
    a = ap.parse_args()
    for m in [m.strip() for m in a.methods.split(",") if m.strip()]:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
        for s in [int(x) for x in a.seeds.split(",")]:
            run_one(m, a.alpha if a.alpha > 0 else None, s, progress=not a.no_progress, train_size=a.train_size)
    if a.merge:
        merge()
    if a.merge_sizes:
        merge_sizes()
