"""research/koala_full.py (issue 15's full-scale driver) and its candidate plugin, on digits: the
plugin with its options off is exactly koala_homo; with the device ensemble on it teaches other
soft labels at the same uplink; merge turns per-(method, seed) part files into the table shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLUS = "research.koala_candidates:KoalaHomoPlus"


def _run(methods: list) -> dict:
    from server_app.sim import load_config, run_experiment

    cfg = load_config(None, dataset="digits", devices=4, proxy_size=200, rounds=2, torch_threads=1, small_eval_samples=200,
                      methods=methods, policy={"large": {"width": 4}, "proxy_per_round": None, "local_epochs": 1})  # fmt: skip
    res = run_experiment(cfg, progress=False, write=False)
    return {r["method"]: (r, res["curves"][r["method"]]) for r in res["rows"]}


def test_plus_without_options_is_koala_homo_and_ensemble_changes_teacher_not_uplink() -> None:
    out = _run([
        {"name": "homo", "preset": "koala_homo"},
        {"name": "plus", "policy": {"strategy": PLUS, "teacher": "avg_model"}},
        {"name": "ens", "policy": {"strategy": PLUS, "teacher": "avg_model", "plugin_options": {"device_ensemble": 1.0}}},
        {"name": "ema", "policy": {"strategy": PLUS, "teacher": "avg_model", "plugin_options": {"teacher_ema": 0.5}}},
        {"name": "ens_ca", "policy": {"strategy": PLUS, "teacher": "avg_model",
                                      "plugin_options": {"device_ensemble": 1.0, "ensemble_fusion": "class_aware"}}},
    ])  # fmt: skip
    homo, plus, ens, ema, ens_ca = (out[k] for k in ("homo", "plus", "ens", "ema", "ens_ca"))
    assert plus[0]["mode"] == "homo"
    assert [c["rkd_loss"] for c in plus[1]] == [c["rkd_loss"] for c in homo[1]]
    assert plus[0]["large_test_acc"] == homo[0]["large_test_acc"]
    assert ens[1][0]["rkd_loss"] != homo[1][0]["rkd_loss"]  # another soft label from round 0
    assert ema[1][0]["rkd_loss"] == homo[1][0]["rkd_loss"]  # nothing to average in round 0...
    assert ema[1][1]["rkd_loss"] != homo[1][1]["rkd_loss"]  # ...then the previous round's teacher counts
    assert ens[0]["bytes_up_per_device_round"] == homo[0]["bytes_up_per_device_round"]  # weights only
    # class-aware: the same device models, other weights per class -> another soft label, same uplink
    assert ens_ca[1][0]["rkd_loss"] not in (ens[1][0]["rkd_loss"], homo[1][0]["rkd_loss"])
    assert ens_ca[0]["bytes_up_per_device_round"] == homo[0]["bytes_up_per_device_round"]


def test_consistent_view_rkd_trains_on_augmented_views() -> None:
    import numpy as np

    from research.koala_candidates import augment

    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
    flipped_or_not = augment(x, 0, np.random.default_rng(1))  # shift 0: only the flip
    assert all(np.array_equal(v, o) or np.array_equal(v, o[:, ::-1]) for v, o in zip(flipped_or_not, x, strict=True))
    views = augment(x, 1, np.random.default_rng(0))
    assert views.shape == x.shape and views.dtype == x.dtype and not np.array_equal(views, x)
    out = _run([
        {"name": "homo", "preset": "koala_homo"},
        {"name": "aug", "policy": {"strategy": PLUS, "teacher": "avg_model", "plugin_options": {"rkd_augment": 1}}},
    ])  # fmt: skip
    homo, aug = out["homo"], out["aug"]
    assert aug[1][0]["rkd_loss"] != homo[1][0]["rkd_loss"] and np.isfinite(aug[1][-1]["rkd_loss"])
    assert 0.0 <= aug[1][-1]["teacher_agreement"] <= 1.0
    assert aug[0]["bytes_up_per_device_round"] == homo[0]["bytes_up_per_device_round"]
    with pytest.raises(ValueError, match="not combined"):
        _run([{"name": "bad", "policy": {"strategy": PLUS, "teacher": "avg_model",
                                         "plugin_options": {"rkd_augment": 1, "teacher_ema": 0.5}}}])  # fmt: skip


def test_plus_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="unknown plugin_options"):
        _run([{"name": "bad", "policy": {"strategy": PLUS, "teacher": "avg_model", "plugin_options": {"nope": 1}}}])
    with pytest.raises(ValueError, match="ensemble_fusion"):
        _run([{"name": "bad", "policy": {"strategy": PLUS, "teacher": "avg_model",
                                         "plugin_options": {"device_ensemble": 1.0, "ensemble_fusion": "median"}}}])  # fmt: skip


def test_merge_builds_rows_with_gaps_and_reductions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import research.koala_full as kf

    monkeypatch.setattr(kf, "RESULTS", tmp_path)
    monkeypatch.setattr(kf, "PARTS_DIR", tmp_path / "parts")
    res = {"fedavg_large": {0: 0.86, 1: 0.84}, "koala_homo": {0: 0.83, 1: 0.82, 2: 0.80}}
    for method, by_seed in res.items():
        for seed, acc in by_seed.items():
            large = method == "fedavg_large"
            row = {"method": method, "mode": "baseline" if large else "homo", "strategy": method, "policy": {},
                   "archs": ["cnn_small"], "large_test_acc": acc, "small_test_acc_mean": None if large else 0.7,
                   "device_param_count": 100 if large else 2, "device_param_bytes": 400 if large else 8,
                   "device_train_flops_per_sample": 1000 if large else 10, "large_param_bytes": 400,
                   "large_train_flops_per_sample": 1000, "bytes_up_per_device_round": 400.0 if large else 4.0,
                   "bytes_down_per_device_round": 400.0, "wall_s": 1.0}  # fmt: skip
            curve = [{"round": r, "large_test_acc": acc - 0.1 * (1 - r), **({} if large else {
                "global_small_test_acc": {"cnn_small": 0.81}, "teacher_agreement": 0.9})} for r in range(2)]  # fmt: skip
            p = kf.part_path(method, 0.5, seed)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"method": method, "alpha": 0.5, "seed": seed, "row": row, "curve": curve,
                                     "partition": {"device_sizes": [10, 20], "proxy": 5}}))  # fmt: skip
    doc = kf.merge()
    assert doc["config"]["alpha"] == [0.5] and doc["config"]["seeds"] == [0, 1, 2] and doc["config"]["train_size"] == 30
    rows = {r["method"]: r for r in doc["rows"]}
    k = rows["koala_homo"]
    assert k["large_test_acc"] == [0.83, 0.82, 0.80] and k["mean"] == pytest.approx(0.8166666, abs=1e-6)
    assert k["gap_vs_fedavg_large"] == pytest.approx(-0.025)  # on the seeds both ran (0, 1)
    assert k["teacher_test_acc"] == [0.81] * 3
    assert k["storage_reduction_vs_fedavg_large"] == pytest.approx(0.98)
    assert k["flops_reduction_vs_fedavg_large"] == pytest.approx(0.99)
    assert k["uplink_reduction_vs_fedavg_large"] == pytest.approx(0.99)
    assert rows["fedavg_large"]["gap_vs_fedavg_large"] == 0.0
    assert (tmp_path / "koala_fmnist_full.png").exists() and (tmp_path / "koala_fmnist_full_curves.json").exists()
    # per round, same seed: round 0 0.73-0.76 and round 1 0.83-0.86 (seed 0), 0.72-0.74 / 0.82-0.84 (seed 1)
    assert k["round_gap_pt_mean"] == pytest.approx([-2.5, -2.5])
    assert k["rounds_ahead"] == {"0": 0, "1": 0}
    assert k["vs_teacher_pt"] == {"0": 2.0, "1": 1.0, "2": -1.0}  # large 0.83 / 0.82 / 0.80 vs teacher 0.81
    assert k["vs_fedavg_small_pt"] == {} and "vs_teacher_pt" not in rows["fedavg_large"]  # no FedAvg-small run here


def test_teacher_ema_blends_rows_seen_before_and_takes_new_rows_as_they_are() -> None:
    import numpy as np

    from research.koala_candidates import TeacherEma

    ema = TeacherEma(4, 0.5)
    a = ema.apply(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert a.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # first sight: unchanged
    b = ema.apply(np.array([[0.0, 1.0], [0.5, 0.5]]), np.array([1, 2]))
    assert b.tolist() == [[0.0, 1.0], [0.5, 0.5]]  # row 1: 0.5 * [0, 1] + 0.5 * [0, 1]; row 2 new
    c = ema.apply(np.array([[0.0, 1.0]]), np.array([0]))
    assert c.tolist() == [[0.5, 0.5]]  # row 0 remembered [1, 0]
    assert TeacherEma(2, 0.0).apply(np.ones((2, 2)), np.arange(2)).tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.mosquitto
def test_full_scale_parity_runs_a_koala_full_method_through_the_deployed_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m research.parity_full METHOD`: the method's simulated part file (run first when
    missing) and the same policy, data layout and torch threads through DemoRun (Mosquitto, agent
    processes), written side by side. Shrunk to digits here; the two paths must agree per round."""
    import research.koala_full as kf
    from research.parity_full import run_full

    monkeypatch.setattr(kf, "RESULTS", tmp_path)
    monkeypatch.setattr(kf, "PARTS_DIR", tmp_path / "parts")
    monkeypatch.setattr(kf, "FULL", {**kf.FULL, "dataset": "digits", "devices": 3, "proxy_size": 200, "rounds": 2,
                                     "small_eval_samples": 200})  # fmt: skip
    monkeypatch.setattr(kf, "BASE_POLICY", {**kf.BASE_POLICY, "large": {"width": 4}})
    monkeypatch.setitem(kf.METHODS, "tiny_hetero", {"name": "tiny_hetero", "preset": "koala_hetero", "archs": "policy",
                                                    "policy": {**kf.KOALA_LEAD, "local_epochs": 1, "fusion": "class_aware",
                                                               "archs": ["mlp_tiny", "cnn_small"], "logits_dtype": "int8",
                                                               "min_devices": 1}})  # fmt: skip
    doc = run_full("tiny_hetero", 0.5, 0, out=tmp_path / "out", progress=False)
    assert kf.part_path("tiny_hetero", 0.5, 0).exists()  # the simulated side was run and kept
    assert len(doc["sim_acc"]) == len(doc["deployed_acc"]) == 2 and doc["deployed_finished"]
    assert doc["max_abs_diff"] <= 0.005, doc  # same code path, same seeds: equal up to summation order
    assert doc["policy"]["archs"] == ["mlp_tiny", "cnn_small"] and doc["torch_threads"] == 1
    saved = json.loads((tmp_path / "out" / "parity_fmnist_full" / "tiny_hetero_a0.5_s0.json").read_text())
    assert saved["deployed_acc"] == doc["deployed_acc"]
