"""Large model: shapes for every input, and >=30x params and FLOPs of the biggest small model."""

import pytest
import torch

from device_firmware_py.runtime.manifest import load_manifest
from server_app.models.flops import flops_per_sample, resource_summary
from server_app.models.large import build_large, param_count

SHAPES = [(28, 28, 1), (32, 32, 3), (8, 8, 1)]
ARCHS = ["mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro"]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_shape_and_ratio(shape):
    m = build_large(shape)
    assert m(torch.zeros(3, *shape)).shape == (3, 10)
    res = resource_summary(m, shape)
    name = "x".join(map(str, shape))
    smalls = [load_manifest(f"{a}_{name}").raw for a in ARCHS]
    assert res["param_count"] >= 30 * max(s["param_count"] for s in smalls)
    assert res["forward_flops_per_sample"] >= 30 * max(s["forward_flops_per_sample"] for s in smalls)
    assert res["train_flops_per_sample"] >= 30 * max(s["train_flops_per_sample"] for s in smalls)


def test_flop_counter_matches_hand_count_for_a_linear():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    f = flops_per_sample(lin, (8, 8, 1))
    assert f["forward_flops_per_sample"] == 2 * 64 * 10
    assert f["train_flops_per_sample"] == 2 * f["forward_flops_per_sample"]  # weight grad only (input needs none)


def test_same_seed_same_init():
    a, b = build_large((8, 8, 1), seed=5), build_large((8, 8, 1), seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert param_count(a) > 1_000_000


def test_resolve_device_names_and_clear_errors():
    from server_app.models.large import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not supported|unknown"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))])  # fmt: skip
def test_reverse_kd_and_prediction_follow_the_model_device(dev):
    """The engine moves data to where the large model lives: a GPU server needs no other code path,
    and the result matches the CPU computation."""
    import numpy as np

    from server_app.engine.distill import reverse_distill
    from server_app.models.large import model_device, predict_logits

    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    q = np.full((64, 10), 0.1, np.float32)
    ref = build_large((8, 8, 1), seed=1, width=4, fc=32)
    m = build_large((8, 8, 1), seed=1, width=4, fc=32).to(dev)
    assert model_device(m).type == dev
    loss_ref = reverse_distill(ref, x, q, epochs=1, batch=32)
    loss = reverse_distill(m, x, q, epochs=1, batch=32)
    assert model_device(m).type == dev and np.isfinite(loss)
    assert abs(loss - loss_ref) < 1e-3
    np.testing.assert_allclose(predict_logits(m, x), predict_logits(ref, x), atol=1e-3)
