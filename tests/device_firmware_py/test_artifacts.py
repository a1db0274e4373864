"""The committed artifacts: complete, builtin-ops-only, consistent with their manifests, runnable."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from device_firmware_py.runtime import flatbuffer
from device_firmware_py.runtime.manifest import ARTIFACTS_DIR, artifact_path, list_manifests
from device_firmware_py.runtime.small_model import SmallModel

SIGNATURES = {"train", "distill", "logits", "get_weights", "set_weights"}
MANIFESTS = list_manifests()
EXPECTED = [
    f"{a}_{s}" for a in ("mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro")
    for s in ("28x28x1", "32x32x3", "8x8x1")
]


def test_every_expected_artifact_is_committed():
    assert sorted(m.name for m in MANIFESTS) == sorted(EXPECTED)


@pytest.mark.parametrize("m", MANIFESTS, ids=lambda m: m.name)
def test_signatures_and_builtin_ops_only_in_every_subgraph(m):
    for path, expect in ((m.tflite_path, SIGNATURES), (m.inference_path, {"logits"})):
        buf = path.read_bytes()
        assert set(flatbuffer.signature_keys(buf)) == expect
        ops = flatbuffer.list_ops(buf)
        assert ops, path
        assert flatbuffer.non_builtin_ops(buf) == [], path
    # The training model really has several subgraphs; checking subgraph 0 alone would not do.
    assert len({u.subgraph for u in flatbuffer.list_ops(m.tflite_path.read_bytes())}) >= 5


@pytest.mark.parametrize("m", MANIFESTS, ids=lambda m: m.name)
def test_manifest_is_consistent(m):
    raw = m.raw
    train = m.tflite_path.read_bytes()
    assert hashlib.sha256(train).hexdigest() == raw["sha256"]
    assert len(train) == raw["tflite_file_bytes"]
    assert hashlib.sha256(m.inference_path.read_bytes()).hexdigest() == raw["inference"]["sha256"]
    assert raw["param_count"] == sum(int(np.prod(s)) for s in m.weight_shapes)
    assert raw["float_bytes"] == 4 * raw["param_count"]
    assert 0 < raw["int8_bytes"] < raw["inference"]["bytes"]
    assert raw["train_flops_per_sample"] > 2 * raw["forward_flops_per_sample"]
    assert raw["param_count"] <= 60_000
    assert m.weight_names == [f"w{i:03d}" for i in range(len(m.weight_names))]


def test_architectures_differ_clearly_in_cost():
    by = {m.name: m.raw["forward_flops_per_sample"] for m in MANIFESTS}
    for s in ("28x28x1", "32x32x3"):
        mlp, cnn, mob = (by[f"{a}_{s}"] for a in ("mlp_tiny", "cnn_small", "mobilenet_tiny"))
        assert mlp * 2 < cnn and cnn * 2 < mob
        # the heterogeneous fleet's third architecture: a MobileNet within 1.5x cnn_small's cost
        assert by[f"mobilenet_micro_{s}"] * 2 < mob and by[f"mobilenet_micro_{s}"] < 1.5 * cnn


@pytest.mark.parametrize("shape", ["28x28x1", "32x32x3"])
@pytest.mark.parametrize("arch", ["mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro"])
def test_full_size_artifacts_train_and_infer(arch, shape):
    """Smoke test at real input sizes: a few train + distill steps, logits of any batch size."""
    m = SmallModel(artifact_path(arch, shape))
    h, w, c = m.input_shape
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, h, w, c)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    before = m.get_weights()
    assert np.isfinite(m.train(x, y, steps=3))
    assert np.isfinite(m.distill(x, rng.normal(size=(40, 10)), temperature=2.0, steps=2))
    after = m.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert m.logits(x[:7]).shape == (7, 10)
    assert np.all(np.isfinite(m.logits(x)))


def test_artifacts_dir_is_packaged_next_to_runtime():
    assert ARTIFACTS_DIR.name == "artifacts" and ARTIFACTS_DIR.parent.name == "device_firmware_py"
