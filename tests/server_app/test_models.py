"""Large model: shapes for every input, and >=30x params and FLOPs of the biggest small model."""

import pytest
import torch

from device_firmware_py.runtime.manifest import load_manifest
from server_app.models.flops import flops_per_sample, resource_summary
from server_app.models.large import build_large, param_count

SHAPES = [(28, 28, 1), (32, 32, 3), (8, 8, 1)]
ARCHS = ["mlp_tiny", "cnn_small", "mobilenet_tiny"]


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
