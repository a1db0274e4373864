"""The documented extension point (docs/extending.md): a user's strategy, fusion rule and large
model, named `module:attr` in the policy, run in `koala sim` exactly as the example file says."""

from __future__ import annotations

import json

import pytest

POLICY = {
    "strategy": "examples.my_koala:ConfidentKoala", "teacher": "device_logits",
    "fusion": "examples.my_koala:top2_fusion", "large": {"factory": "examples.my_koala:tiny_mlp", "options": {"hidden": 32}},
    "plugin_options": {"keep_fraction": 0.75}, "rounds": 2, "local_epochs": 2, "rkd_epochs": 5, "lr": 3e-3,
}  # fmt: skip


def test_example_plugins_run_in_koala_sim(tmp_path):
    from server_app.cli import main

    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"policy": POLICY}))
    out = tmp_path / "sim"
    assert main(["sim", "--dataset", "digits", "--devices", "4", "--policy", str(pol),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    curves = json.loads((out / "curves.json").read_text())["curves"]
    (curve,) = curves.values()
    assert [c.get("kept_devices") for c in curve] == [3, 3], curve  # the plugin strategy ran (keeps 3 of 4)
    assert all(c["large_test_acc"] is not None for c in curve)
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["policy"]["large"]["factory"] == "examples.my_koala:tiny_mlp"


def test_bad_plugin_reference_is_a_clear_error():
    from server_app.engine.strategies import build_strategy
    from server_app.policy import KoalaPolicy, PolicyError

    with pytest.raises(PolicyError, match="cannot be loaded"):
        build_strategy(KoalaPolicy(strategy="examples.my_koala:NoSuchThing"))
