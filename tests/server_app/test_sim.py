"""`koala sim`: configs (JSON/TOML/YAML), reproducibility from the seed, CLI outputs."""

import json

import pytest

from server_app.cli import main
from server_app.sim.config import load_config
from server_app.sim.runner import run_experiment

SMALL = {"dataset": "digits", "devices": 3, "alpha": 1.0, "proxy_size": 200, "rounds": 2, "local_epochs": 1,
         "rkd_epochs": 1, "large": {"width": 8, "fc": 128}, "small_eval_samples": 100}  # fmt: skip


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


def test_cli_writes_json_and_png(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**SMALL, "methods": ["koala_homo_logits", "local_only"]}))
    out = tmp_path / "out"
    assert main(["sim", "--config", str(cfg), "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["koala_homo_logits", "local_only"]
    assert (out / "accuracy.png").stat().st_size > 1000
    assert main(["data", "info", "--dataset", "digits", "--devices", "3", "--proxy-size", "100"]) == 0
