"""`koala sim`: configs (JSON/TOML/YAML), reproducibility from the seed, CLI outputs."""

import json

import pytest

from server_app.cli import main
from server_app.sim.config import load_config
from server_app.sim.runner import run_experiment

SMALL = {"dataset": "digits", "devices": 3, "alpha": 1.0, "proxy_size": 200, "rounds": 2, "local_epochs": 1,
         "rkd_epochs": 1, "large": {"width": 8, "options": {"fc": 128}}, "small_eval_samples": 100}  # fmt: skip


def _curves(seed, methods):
    cfg = load_config(None, **SMALL, seed=seed, methods=methods)
    return run_experiment(cfg, progress=False, write=False)["curves"]


def _strip_times(curves):
    return {m: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in c] for m, c in curves.items()}


def test_same_seed_same_metrics():
    methods = ["koala_hetero", "koala_homo"]
    a, b = _strip_times(_curves(1, methods)), _strip_times(_curves(1, methods))
    assert a == b
    c = _strip_times(_curves(2, ["koala_hetero"]))
    assert c["koala_hetero"] != a["koala_hetero"]


@pytest.mark.parametrize("fmt", ["json", "toml", "yaml"])
def test_config_formats(tmp_path, fmt):
    p = tmp_path / f"exp.{fmt}"
    if fmt == "json":
        p.write_text(json.dumps({"dataset": "digits", "rounds": 4, "methods": ["koala_homo"]}))
    elif fmt == "toml":
        p.write_text('dataset = "digits"\nrounds = 4\nmethods = ["koala_homo"]\n')
    else:
        p.write_text("dataset: digits\nrounds: 4\nmethods: [koala_homo]\n")
    cfg = load_config(p, devices=7)
    assert (cfg.rounds, cfg.devices, cfg.method_specs()[0].strategy) == (4, 7, "koala_homo")
    with pytest.raises(ValueError):
        load_config(None, **{"no_such_key": 1})


def test_policy_section_and_method_overrides(tmp_path):
    p = tmp_path / "exp.json"
    p.write_text(json.dumps({
        "dataset": "digits", "seed": 5, "policy": {"rounds": 3, "local_epochs": 2},
        "methods": ["koala_hetero", {"name": "homo_t2", "preset": "koala_homo", "policy": {"temperature": 2.0}},
                    {"name": "mean", "policy": {"strategy": "koala_hetero", "fusion": "mean"}}],
    }))  # fmt: skip
    cfg = load_config(p)
    assert cfg.rounds == 3 and cfg.seed == 5 and cfg.policy.local_epochs == 2  # top-level policy keys join the policy
    with pytest.raises(AttributeError):
        cfg.rounds = 4  # read from the policy
    specs = cfg.method_specs()
    pols = [s.policy(cfg.policy, cfg.homo_arch, cfg.hetero_archs) for s in specs]
    assert pols[0].strategy == "koala_hetero" and pols[0].fusion == "class_aware" and pols[0].archs == cfg.hetero_archs
    assert pols[1].strategy == "koala_homo" and pols[1].temperature == 2.0 and pols[1].local_epochs == 2
    assert pols[1].archs == [cfg.homo_arch]
    assert pols[2].fusion == "mean" and specs[2].archs == "hetero"
    with pytest.raises(ValueError, match="under 'policy'"):
        load_config(None, methods=[{"name": "x", "options": {"T": 2.0}}]).method_specs()
    with pytest.raises(ValueError):
        load_config(None, methods=["koala_hetero_class_aware", "no_such_preset"]).method_specs()
    with pytest.raises(ValueError):  # policy fields are validated
        load_config(None, local_epochs=-1)


def test_cli_writes_json_and_png(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**SMALL, "methods": ["koala_homo_logits", "local_only"]}))
    out = tmp_path / "out"
    assert main(["sim", "--config", str(cfg), "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["koala_homo_logits", "local_only"]
    assert all("options" not in r and r["rounds"] == 1 for r in rows)
    assert rows[0]["policy"]["teacher"] == "device_logits" and rows[0]["policy"]["local_epochs"] == 1
    assert (out / "accuracy.png").stat().st_size > 1000
    assert main(["data", "info", "--dataset", "digits", "--devices", "3", "--proxy-size", "100"]) == 0
