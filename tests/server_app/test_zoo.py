"""The small-model zoo: architecture plans (no TF), `koala zoo list`, and a real rebuild (TF)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from device_firmware_py.runtime.manifest import load_manifest
from server_app.zoo.archs import ARCHS, parse_input, plan

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def test_plans_match_committed_manifests():
    for arch in ARCHS:
        for shape in ((28, 28, 1), (32, 32, 3), (8, 8, 1)):
            p = plan(arch, shape)
            m = load_manifest(f"{arch}_{shape[0]}x{shape[1]}x{shape[2]}")
            assert m.param_count == p.param_count
            assert m.weight_shapes == [w.shape for w in p.weights]
            assert m.raw["forward_flops_per_sample"] == p.forward_flops


def test_cnn_small_flops_by_hand():
    p = plan("cnn_small", (28, 28, 1))
    conv1 = 28 * 28 * 9 * 1 * 8
    conv2 = 14 * 14 * 9 * 8 * 16
    dense = 7 * 7 * 16 * 10
    assert p.forward_flops == 2 * (conv1 + conv2 + dense)
    # weight grads for all three layers, input grads for conv2 and dense only
    assert p.train_flops == p.forward_flops + 2 * (conv1 + conv2 + dense) + 2 * (conv2 + dense)
    assert p.param_count == (9 * 8 + 8) + (9 * 8 * 16 + 16) + (784 * 10 + 10)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        parse_input("28x28")
    with pytest.raises(ValueError):
        plan("cnn_small", (7, 7, 1))  # odd size can not be pooled
    with pytest.raises(ValueError):
        plan("resnet", (28, 28, 1))


def test_zoo_list_command_runs_without_tensorflow():
    code = (
        "import sys, runpy; sys.argv=['koala','zoo','list','--json'];"
        "from server_app.cli import main; rc = main(sys.argv[1:]);"
        "assert 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert {r["arch"] for r in rows} == set(ARCHS)


_VOLATILE = {"sha256", "tflite_file_bytes", "int8_bytes"}


def _stable(manifest: dict) -> dict:
    """Manifest fields that must be identical on any rebuild (flatbuffer bytes may legally differ)."""
    m = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    m["inference"] = {"file": manifest["inference"]["file"]}
    return m


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason="needs tensorflow-cpu (extra 'export')")
def test_rebuild_reproduces_committed_artifact(tmp_path):
    from device_firmware_py.runtime.quantize import TFLiteLogits
    from device_firmware_py.runtime.small_model import SmallModel

    name = "cnn_small_8x8x1"
    out = subprocess.run(
        [sys.executable, "-m", "server_app.cli", "zoo", "build", "--arch", "cnn_small", "--input", "8x8x1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    committed = load_manifest(name)
    rebuilt = load_manifest(tmp_path / f"{name}.json")
    assert _stable(rebuilt.raw) == _stable(committed.raw)
    # Same seeded initial weights, and same function of the weights: logits on shared weights.
    a, b = SmallModel(committed.tflite_path), SmallModel(rebuilt.tflite_path)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    rng = np.random.default_rng(1)
    w = [rng.normal(0, 0.3, s).astype(np.float32) for s in committed.weight_shapes]
    a.set_weights(w)
    b.set_weights(w)
    x = rng.uniform(size=(64, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(a.logits(x), b.logits(x), rtol=1e-5, atol=1e-5)
    # One training step on the same batch moves both the same way (the gradient graph matches too).
    y = rng.integers(0, 10, 64)
    a.train(x, y, steps=1, lr=1e-2)
    b.train(x, y, steps=1, lr=1e-2)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    # The rebuilt inference model's patch table is valid for these weights as well.
    np.testing.assert_allclose(TFLiteLogits(b.float_inference_model())(x), b.logits(x), atol=1e-4)
