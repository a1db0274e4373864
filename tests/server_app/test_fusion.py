"""fuse_logits on hand-made inputs. Logits are log-probabilities, so softmax(logits) == probs at T=1.

Two devices, one proxy sample, two classes: A says p=[0.9, 0.1], B says p=[0.3, 0.7].
"""

import numpy as np
import pytest

from server_app.engine.fusion import fuse_logits, softmax

A, B = np.log([[0.9, 0.1]]), np.log([[0.3, 0.7]])


def test_mean():
    # (0.9+0.3)/2, (0.1+0.7)/2
    np.testing.assert_allclose(fuse_logits([A, B], "mean"), [[0.6, 0.4]], atol=1e-6)


def test_sample_weighted():
    # n = [1, 3]: 0.25*A + 0.75*B = [0.45, 0.55]
    np.testing.assert_allclose(fuse_logits([A, B], "weighted", num_samples=[1, 3]), [[0.45, 0.55]], atol=1e-6)


def test_entropy_weighted_favours_the_confident_device():
    # w = 1 - H/log2 + 1e-3: A 0.53200, B 0.11971 -> q = [0.78979, 0.21021]
    np.testing.assert_allclose(fuse_logits([A, B], "entropy"), [[0.78979, 0.21021]], atol=1e-4)


def test_class_aware_device_does_not_vote_on_unseen_class():
    # A saw only class 0 (hist [10, 0]), B saw both ([10, 10]).
    # class 0 shares: A .5, B .5 -> 0.5*0.9 + 0.5*0.3 = 0.6 ; class 1 shares: A 0, B 1 -> 0.7
    # renormalised: [0.6/1.3, 0.7/1.3] = [0.461538, 0.538462]  (mean would say class 0)
    q = fuse_logits([A, B], "class_aware", label_histograms=[[10, 0], [10, 10]])
    np.testing.assert_allclose(q, [[0.6 / 1.3, 0.7 / 1.3]], atol=1e-6)
    assert q.argmax() == 1 and fuse_logits([A, B], "mean").argmax() == 0


def test_class_aware_unseen_by_all_falls_back_to_mean():
    # nobody saw class 1: its share is 1/2 each -> q1 = 0.4; class 0: A only -> 0.9 ; -> [0.9, 0.4]/1.3
    q = fuse_logits([A, B], "class_aware", label_histograms=[[5, 0], [0, 0]])
    np.testing.assert_allclose(q, [[0.9 / 1.3, 0.4 / 1.3]], atol=1e-6)


def test_group_first():
    # groups x: A (n=1); y: B (n=3), C=[0.5,0.5] (n=1) -> y = (3B + C)/4 = [0.35, 0.65]
    # inner weighted (x 1, y 4): 0.2*[0.9,0.1] + 0.8*[0.35,0.65] = [0.46, 0.54]; inner mean: [0.625, 0.375]
    C = np.log([[0.5, 0.5]])
    kw = {"num_samples": [1, 3, 1], "groups": ["x", "y", "y"]}
    np.testing.assert_allclose(fuse_logits([A, B, C], "group", **kw), [[0.46, 0.54]], atol=1e-6)
    np.testing.assert_allclose(fuse_logits([A, B, C], "group", inner="mean", **kw), [[0.625, 0.375]], atol=1e-6)


def test_temperature_softens_and_rows_sum_to_one():
    logits = np.random.default_rng(0).normal(size=(3, 5, 4)) * 4
    for rule in ("mean", "entropy"):
        q = fuse_logits(logits, rule, temperature=3.0)
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
    assert softmax(logits[0], 3.0).max() < softmax(logits[0], 1.0).max()


def test_unknown_rule_and_missing_inputs():
    with pytest.raises(ValueError):
        fuse_logits([A, B], "no_such_rule")  # (median is a robust rule now)
    with pytest.raises(ValueError):
        fuse_logits([A, B], "class_aware")
