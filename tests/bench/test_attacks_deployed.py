"""bench/attacks_deployed.py through its own code path, tiny: digits, 3 devices (one an attacker
process sending sign-flipped weights over the broker), 2 rounds; clean, honest-only and attacked
runs. The full table (Fashion-MNIST, 5 devices, 1 and 2 of 5) is `python -m bench.attacks_deployed`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                       reason="needs the mosquitto binary"),
]  # fmt: skip


def test_forge_keeps_the_format():
    """The attacker's result is a valid contract Result of the same shapes (it must pass the checks)."""
    from bench.attack_agent import forge
    from device_firmware_py.contract.messages import Result

    r = Result(round_id=0, device_id="dev000", arch="mlp_tiny", num_samples=10, label_histogram=[1] * 10,
               proxy_logits=np.ones((4, 10), np.float32), weights=[np.ones((2, 3), np.float32)])  # fmt: skip
    s = forge(r, "sign_flip")
    assert np.array_equal(s.weights[0], -r.weights[0]) and np.array_equal(s.proxy_logits, -r.proxy_logits)
    o = forge(r, "onehot_logits")
    assert o.proxy_logits.shape == (4, 10) and (o.proxy_logits.argmax(1) == 3).all()
    assert np.array_equal(o.weights[0], r.weights[0])
    with pytest.raises(ValueError):
        forge(r, "nope")


def test_quick_attack_run_over_the_broker(tmp_path):
    from bench.attacks_deployed import run

    doc = run(quick=True, out=tmp_path, progress=False)
    saved = json.loads(Path(doc["path"]).read_text())
    (row,) = saved["rows"]
    for key in ("attack", "malicious", "devices", "clean_acc", "honest_only_acc", "attacked_acc",
                "nonfinite_models", "failed_rounds"):  # fmt: skip
        assert key in row
    assert (row["attack"], row["malicious"], row["devices"]) == ("sign_flip", 1, 3)
    assert row["nonfinite_models"] == 0 and row["failed_rounds"] == 0
    runs = {r["kind"]: r for r in saved["raw"]["runs"]}
    assert all(r["finished"] and r["rounds_completed"] == 2 for r in runs.values())
    # the attacker process spoke the protocol: its results were accepted, then dropped by a defence
    attacked = runs["attacked"]["rounds"]
    assert all("dev000" in r["accepted"] for r in attacked)
    assert all(r["malicious_in_model"] == [] for r in attacked), attacked
    assert all("dev000" not in r["accepted"] for r in runs["honest_only"]["rounds"])
    assert runs["attacked"]["labeled_proxy"] == 30
