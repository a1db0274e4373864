"""ModelGate on a small LargeCNN trained on digits (8x8): a NaN'd, collapsed or degraded model is
rejected, a normally trained one accepted, and snapshot/restore rolls a bad round back."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server_app.data.datasets import load_dataset
from server_app.engine.distill import reverse_distill
from server_app.engine.fusion import softmax
from server_app.engine.gate import ModelGate, restore, snapshot
from server_app.models.large import build_large, predict_logits


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("digits")
    return ds.x_train, ds.y_train, ds.x_test, ds.y_test


def _train(model, x, y, epochs=15, seed=0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only contend on a busy box
    try:
        return _train_steps(model, x, y, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model, x, y, epochs, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained(data):
    x, y, _, _ = data
    return _train(build_large((8, 8, 1), width=8, fc=64, seed=1), x, y)


def _fresh():
    return build_large((8, 8, 1), width=8, fc=64, seed=1)


def test_trained_model_is_accepted_after_a_random_one(data, trained):
    _, _, xe, ye = data
    d = ModelGate().evaluate(_fresh(), trained, xe, ye)
    assert d.ok and d.reason is None, d
    assert d.metrics["acc_after"] > 0.8 and not d.metrics["established"]  # round 0: the previous was random


def test_round_zero_random_to_random_is_not_an_accuracy_drop(data):
    # previous at chance: no drop check (nothing to lose), even if the new one is also poor
    _, _, xe, ye = data
    d = ModelGate().evaluate(_fresh(), build_large((8, 8, 1), width=8, fc=64, seed=2), xe, ye)
    assert d.metrics["established"] is False
    assert d.reason != "accuracy_drop"


def test_nan_model_is_rejected(data, trained):
    _, _, xe, ye = data
    bad = _fresh()
    bad.load_state_dict(trained.state_dict())
    with torch.no_grad():
        next(bad.parameters())[0, 0, 0, 0] = float("nan")
    for y in (ye, None):
        d = ModelGate().evaluate(predict_logits(trained, xe), bad, xe, y)
        assert not d.ok and d.reason == "non_finite_params"


def test_overflowing_outputs_are_rejected(data, trained):
    _, _, xe, _ = data
    bad = _fresh()
    bad.load_state_dict(trained.state_dict())
    with torch.no_grad():
        bad.classifier[-1].weight.mul_(1e38)  # finite parameters, inf/nan logits
    d = ModelGate().evaluate(trained, bad, xe)
    assert not d.ok and d.reason == "non_finite_outputs"


def _collapsed(trained, cls=3):
    bad = _fresh()
    bad.load_state_dict(trained.state_dict())
    with torch.no_grad():
        bad.classifier[-1].bias[cls] += 1e4
    return bad


def test_collapsed_model_is_rejected_with_and_without_labels(data, trained):
    _, _, xe, ye = data
    before = predict_logits(trained, xe)
    for y in (ye, None):
        d = ModelGate().evaluate(before, _collapsed(trained), xe, y)
        assert not d.ok and d.reason == "collapse" and d.metrics["top_share_after"] > 0.9


def test_one_class_labels_are_not_collapse(data, trained):
    # if the slice really is all class 3, predicting class 3 everywhere is right, not a collapse
    _, _, xe, ye = data
    x3 = xe[ye == 3]
    spread_before = np.eye(10)[np.arange(len(x3)) % 10]  # a previous model that predicted every class
    d = ModelGate().evaluate(spread_before, _collapsed(trained), x3, ye[ye == 3])
    assert d.ok and d.metrics["top_share_after"] == 1.0, d


def test_accuracy_drop_is_rejected_once_past_chance(data, trained):
    _, _, xe, ye = data
    worse = _fresh()
    worse.load_state_dict(trained.state_dict())
    with torch.no_grad():  # scramble the output layer's rows: still confident, mostly wrong classes
        w = worse.classifier[-1].weight
        w.copy_(w[torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])])
    d = ModelGate().evaluate(trained, worse, xe, ye)
    assert not d.ok and d.reason == "accuracy_drop" and d.metrics["established"], d
    # without labels: agreement with the established previous model collapses
    d = ModelGate().evaluate(trained, worse, xe)
    assert not d.ok and d.reason == "disagreement", d
    # with pseudo-labels from soft targets (e.g. the fused teacher on a held-out proxy slice)
    q = softmax(predict_logits(trained, xe))
    d = ModelGate().evaluate(trained, worse, xe, soft_targets=q)
    assert not d.ok and d.reason == "accuracy_drop" and d.metrics["kd_after"] > d.metrics["kd_before"]


def test_a_normal_distillation_round_is_accepted_and_restore_rolls_back(data, trained):
    x, _, xe, ye = data
    model = _fresh()
    model.load_state_dict(trained.state_dict())
    snap = snapshot(model)
    before = predict_logits(model, xe)
    q = softmax(predict_logits(trained, x), 2.0)  # a sane teacher
    reverse_distill(model, x, q, T=2.0, epochs=1, lr=1e-4, batch=128)
    d = ModelGate().evaluate(before, model, xe, ye)
    assert d.ok, d
    # a poisoned round: NaN everywhere -> rejected -> restore -> outputs identical to before
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    assert ModelGate().evaluate(before, model, xe, ye).reason == "non_finite_params"
    restore(model, snap)
    np.testing.assert_array_equal(predict_logits(model, xe), before)
    # the snapshot is a copy: training again does not change it, and restore works twice
    reverse_distill(model, x, q, T=2.0, epochs=1, lr=1e-3, batch=128)
    restore(model, snap)
    np.testing.assert_array_equal(predict_logits(model, xe), before)


def test_kd_increase_gate_is_opt_in(data, trained):
    _, _, xe, _ = data
    q = softmax(predict_logits(trained, xe))
    noisy = _fresh()
    noisy.load_state_dict(trained.state_dict())
    with torch.no_grad():
        w = noisy.classifier[-1].weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)), alpha=0.005)
    d = ModelGate().evaluate(trained, noisy, xe, soft_targets=q)
    assert d.ok and "kd_after" in d.metrics
    d = ModelGate(max_kd_increase=0.0).evaluate(trained, noisy, xe, soft_targets=q)
    assert not d.ok and d.reason == "kd_increase" and d.metrics["kd_after"] > d.metrics["kd_before"]
