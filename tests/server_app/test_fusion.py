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


def _stacked(logits, rule, n, hists, groups, inner="weighted", temperature=1.0):
    """The [D, P, C] formulas fuse_logits used before it streamed (the reference)."""
    p = softmax(np.stack(logits).astype(np.float64), temperature)
    D, _, C = p.shape
    if rule == "mean":
        out = p.mean(axis=0)
    elif rule == "weighted":
        out = np.tensordot(n / n.sum(), p, axes=1)
    elif rule == "entropy":
        h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)
        w = 1.0 - h / np.log(C) + 1e-3
        out = ((w / w.sum(axis=0, keepdims=True))[..., None] * p).sum(axis=0)
    elif rule == "class_aware":
        hist = np.asarray(hists, np.float64)
        share = hist / np.where(hist.sum(axis=0) > 0, hist.sum(axis=0), 1.0)
        share[:, hist.sum(axis=0) == 0] = 1.0 / D
        out = np.einsum("dc,dpc->pc", share, p)
    else:  # group
        names = sorted(set(groups))
        gp = [np.tensordot(n[[i for i, g in enumerate(groups) if g == x]] / n[[i for i, g in enumerate(groups) if g == x]].sum(),
                           p[[i for i, g in enumerate(groups) if g == x]], axes=1) for x in names]  # fmt: skip
        gw = np.asarray([n[[i for i, g in enumerate(groups) if g == x]].sum() for x in names]) if inner == "weighted" \
            else np.ones(len(names))  # fmt: skip
        out = np.tensordot(gw / gw.sum(), np.stack(gp), axes=1)
    return out / out.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("rule", ["mean", "weighted", "entropy", "class_aware", "group"])
def test_linear_rules_stream_to_the_stacked_values(rule):
    """The linear rules fold teachers in one at a time (memory O(P x C), not O(D x P x C)): same
    consensus as the stacked formulas, float16 teachers (as accepted results are held) included."""
    rng = np.random.default_rng(7)
    D, P, C = 9, 50, 10
    logits = [(rng.standard_normal((P, C)) * 3).astype(np.float16) for _ in range(D)]
    n = rng.integers(1, 500, D).astype(np.float64)
    hists = rng.integers(0, 30, (D, C))
    hists[:, 3] = 0  # a class nobody saw
    groups = [["a", "b", "c"][i % 3] for i in range(D)]
    got = fuse_logits(logits, rule, 2.0, num_samples=n, label_histograms=hists, groups=groups)
    want = _stacked([z.astype(np.float64) for z in logits], rule, n, hists, groups, temperature=2.0)
    assert got.dtype == np.float32 and got.shape == (P, C)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if rule == "group":
        np.testing.assert_allclose(fuse_logits(logits, rule, 2.0, num_samples=n, groups=groups, inner="mean"),
                                   _stacked([z.astype(np.float64) for z in logits], rule, n, hists, groups, "mean", 2.0),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError):
        fuse_logits([logits[0], logits[1][:, :5]], rule, num_samples=n[:2], label_histograms=hists[:2], groups=groups[:2])
