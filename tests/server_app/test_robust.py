"""One malicious device among five cannot move the robust aggregates far; the plain mean / FedAvg
is moved by the same attacks (so these tests can fail).

Logits: 400 proxy samples, 10 classes, ground truth y. Honest device d sends 2*onehot(y) + N(0,1)
noise (a weak, noisy teacher: the honest mean is ~96% accurate, with small margins, so a fifth of
the vote is enough to flip many samples). Metric: accuracy of the fused argmax vs y, compared with
the honest-only mean's accuracy: robust rules lose <= 0.06, the plain mean loses >= 0.09.

Weights: honest device = reference + common update + small noise. Metric: L2 distance to the honest
devices' FedAvg, compared with the honest spread s = max_i ||w_i - honest FedAvg||: robust rules
stay within 2 s, FedAvg with the attacker is > 10 s away (or non-finite).
"""

import numpy as np
import pytest

from server_app.engine.fusion import ROBUST_RULES, fuse_logits
from server_app.engine.robust import (
    aggregate_weights,
    cap_sample_counts,
    coordinate_median,
    coordinate_trimmed_mean,
    krum_select,
    magnitude_bound,
    trim_count,
    weights_violation,
)
from server_app.engine.strategies.common import fedavg

P, C, H = 400, 10, 4
_rng = np.random.default_rng(0)
Y = _rng.integers(0, C, P)
HONEST = [2.0 * np.eye(C)[Y] + np.random.default_rng(i + 1).normal(0, 1.0, (P, C)) for i in range(H)]
HONEST_ACC = float(np.mean(fuse_logits(HONEST, "mean").argmax(1) == Y))

LOGIT_ATTACKS = {
    "random": _rng.normal(size=(P, C)) * 1e30,  # huge random logits: a random one-hot per sample
    "sign_flip": -1e3 * np.mean(HONEST, axis=0),  # the honest consensus, negated and amplified
    "constant": np.tile(_rng.normal(size=C) * 1e30, (P, 1)),  # the same (huge) output for every input
    "one_hot": np.eye(C)[np.full(P, 3)] * 1e30,  # always class 3, at 1e30
    "wrong_class": np.eye(C)[(Y + 1) % C] * 1e30,  # targeted: always the next class
}


def _acc(q: np.ndarray) -> float:
    return float(np.mean(q.argmax(1) == Y))


def test_honest_baseline_is_a_good_teacher():
    assert HONEST_ACC > 0.9


@pytest.mark.parametrize("attack", sorted(LOGIT_ATTACKS))
def test_plain_mean_is_broken_by_one_attacker(attack):
    for rule in ("mean", "weighted"):
        # the attacker also claims 1000x the samples: "weighted" hands it the vote
        q = fuse_logits([*HONEST, LOGIT_ATTACKS[attack]], rule, num_samples=[10] * H + [10_000])
        assert _acc(q) <= HONEST_ACC - 0.09, (rule, _acc(q))


@pytest.mark.parametrize("attack", sorted(LOGIT_ATTACKS))
@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_robust_fusion_bounds_one_attacker(rule, attack):
    q = fuse_logits([*HONEST, LOGIT_ATTACKS[attack]], rule, num_samples=[10] * H + [10_000])
    assert q.dtype == np.float32 and np.all(np.isfinite(q))
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
    assert _acc(q) >= HONEST_ACC - 0.06, _acc(q)


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_robust_fusion_clean_cost_is_small(rule):
    # five honest devices: the robust rules keep (nearly) the mean's accuracy
    honest5 = [*HONEST, 2.0 * np.eye(C)[Y] + np.random.default_rng(99).normal(0, 1.0, (P, C))]
    assert _acc(fuse_logits(honest5, rule)) >= _acc(fuse_logits(honest5, "mean")) - 0.03


def test_non_finite_logits_do_not_poison_fusion():
    bad = np.full((P, C), np.nan)
    bad[:, 0] = np.inf
    for rule in ("mean", *ROBUST_RULES):
        q = fuse_logits([*HONEST, bad], rule, temperature=0.5)
        assert np.all(np.isfinite(q)), rule
    assert _acc(fuse_logits([*HONEST, bad], "median")) >= HONEST_ACC - 0.06


def test_median_and_trimmed_mean_by_hand():
    # one sample, 2 classes, 5 devices; p(class 0) = .9 .8 .7 .6 and an attacker at 0.0
    p0 = np.array([0.9, 0.8, 0.7, 0.6, 0.0])
    logits = [np.log([[a, 1 - a]]) if a > 0 else np.array([[-1e30, 1e30]]) for a in p0]
    # median of class-0 probs .7, of class-1 probs .3 -> [.7, .3]
    np.testing.assert_allclose(fuse_logits(logits, "median"), [[0.7, 0.3]], atol=1e-6)
    # trim 1 of 5 each end: class 0 -> mean(.6,.7,.8) = .7, class 1 -> mean(.2,.3,.4) = .3
    np.testing.assert_allclose(fuse_logits(logits, "trimmed_mean"), [[0.7, 0.3]], atol=1e-6)
    # the plain mean is dragged by the attacker: (3.0 / 5) = .6
    np.testing.assert_allclose(fuse_logits(logits, "mean"), [[0.6, 0.4]], atol=1e-6)


def test_trim_count_degrades_with_few_devices():
    assert [trim_count(d, 0.2) for d in (1, 2, 3, 4, 5, 10, 11)] == [0, 0, 0, 0, 1, 2, 2]
    assert trim_count(3, 0.4) == 1 and trim_count(2, 0.49) == 0
    x = np.array([[1.0], [2.0], [100.0]])
    np.testing.assert_allclose(coordinate_trimmed_mean(x, 0.2), [103 / 3])  # k = 0: the mean
    np.testing.assert_allclose(coordinate_trimmed_mean(x, 0.4), [2.0])  # k = 1 of 3: the median
    with pytest.raises(ValueError):
        trim_count(5, 0.5)


def test_coordinatewise_result_stays_in_the_honest_range_whatever_the_attacker_sends():
    # the guarantee behind trimmed mean / median: f <= k attackers cannot leave the honest [min, max]
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(8, 50))
    lo, hi = honest.min(0), honest.max(0)
    for attack in (1e30, -1e30, 0.0, 5.0):
        for f in (1, 2):
            x = np.concatenate([honest, np.full((f, 50), attack)])
            for out in (coordinate_trimmed_mean(x, 0.2), coordinate_median(x)):  # k = 2 of 10
                assert np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)


# ------------------------------------------------------------------------------------------ weights
SHAPES = [(6, 4), (4,), (4, 3), (3,)]
REF = [np.random.default_rng(10 + i).normal(0, 0.5, s).astype(np.float32) for i, s in enumerate(SHAPES)]
STEP = [np.random.default_rng(20 + i).normal(0, 0.05, s) for i, s in enumerate(SHAPES)]
HONEST_W = [
    [(r + u + np.random.default_rng(30 + d * 7 + i).normal(0, 0.01, r.shape)).astype(np.float32)
     for i, (r, u) in enumerate(zip(REF, STEP, strict=True))]
    for d in range(H)
]  # fmt: skip
HONEST_N = [50, 80, 120, 60]
HONEST_AVG = fedavg(HONEST_W, HONEST_N)


def _dist(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(
        np.sqrt(
            sum(
                np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                for x, y in zip(a, b, strict=True)
            )
        )
    )


SPREAD = max(_dist(w, HONEST_AVG) for w in HONEST_W)
_mean_w = [np.mean([w[i] for w in HONEST_W], axis=0) for i in range(len(SHAPES))]
WEIGHT_ATTACKS = {
    "scaled": [w * np.float32(1e30) for w in HONEST_W[0]],  # finite in float32 (max 3.4e38)
    "sign_flip": [
        (r - 10 * (m - r)).astype(np.float32) for r, m in zip(REF, _mean_w, strict=True)
    ],  # reversed update x10
    "random": [
        np.random.default_rng(40 + i).normal(0, 3.0, s).astype(np.float32) for i, s in enumerate(SHAPES)
    ],
    "constant": [np.full(s, 7.0, np.float32) for s in SHAPES],
}
ROBUST_WEIGHT_RULES = ("median", "trimmed_mean", "krum", "multi_krum")


@pytest.mark.parametrize("attack", sorted(WEIGHT_ATTACKS))
def test_fedavg_is_broken_by_one_attacker(attack):
    out = aggregate_weights([*HONEST_W, WEIGHT_ATTACKS[attack]], [*HONEST_N, 80], "fedavg")
    d = _dist(out, HONEST_AVG)
    assert not np.isfinite(d) or d > 10 * SPREAD, (d, SPREAD)


@pytest.mark.parametrize("attack", sorted(WEIGHT_ATTACKS))
@pytest.mark.parametrize("rule", ROBUST_WEIGHT_RULES)
def test_robust_weight_rules_bound_one_attacker(rule, attack):
    info: dict = {}
    out = aggregate_weights([*HONEST_W, WEIGHT_ATTACKS[attack]], [*HONEST_N, 10**9], rule, info=info)
    assert [o.shape for o in out] == SHAPES and all(o.dtype == np.float32 for o in out)
    assert _dist(out, HONEST_AVG) <= 2 * SPREAD, (_dist(out, HONEST_AVG), SPREAD)
    if rule.endswith("krum"):
        assert H not in info["selected"]  # the attacker (index 4) is never picked


@pytest.mark.parametrize("attack", sorted(WEIGHT_ATTACKS))
def test_update_clipping_bounds_fedavg(attack):
    # with the global weights as reference, each update is clipped to 2 x the median update norm,
    # so even plain (equal-weight) FedAvg moves by at most (bound + honest update norm) / D
    info: dict = {}
    ws = [*HONEST_W, WEIGHT_ATTACKS[attack]]
    out = aggregate_weights(ws, None, "fedavg", reference=REF, info=info)
    honest_norm = np.median(info["update_norms"])
    assert info["clipped"] == [H] and info["clip_bound"] == pytest.approx(2 * honest_norm)
    # the attacker moves the equal-weight mean by at most (bound + honest norm) / 5
    honest_eq = aggregate_weights(HONEST_W, None, "fedavg")
    assert _dist(out, honest_eq) <= (info["clip_bound"] + honest_norm) / 5 + 1e-6
    # explicit bound
    out2 = aggregate_weights(ws, None, "median", reference=REF, clip_norm=0.05, info=info)
    assert (
        info["clip_bound"] == 0.05 and len(info["clipped"]) >= 1 and all(np.isfinite(o).all() for o in out2)
    )


def test_fedavg_rule_matches_common_fedavg_and_is_deterministic():
    a = aggregate_weights(HONEST_W, HONEST_N, "fedavg")
    for x, y in zip(a, HONEST_AVG, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    b = aggregate_weights(HONEST_W, HONEST_N, "trimmed_mean")
    c = aggregate_weights(HONEST_W, HONEST_N, "trimmed_mean")
    assert all(np.array_equal(x, y) for x, y in zip(b, c, strict=True))


def test_krum_picks_the_most_central_and_survives_huge_values():
    v = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [1e30, -1e30]])
    keep, scores = krum_select(v, num_malicious=1, num_keep=1)
    assert np.all(np.isfinite(scores)) and keep[0] != 4 and scores[4] == scores.max()


def test_aggregate_rejects_bad_inputs():
    with pytest.raises(ValueError):
        aggregate_weights([], [], "median")
    with pytest.raises(ValueError):
        aggregate_weights(HONEST_W, HONEST_N, "mode")
    with pytest.raises(ValueError):  # shape mismatch
        aggregate_weights([HONEST_W[0], HONEST_W[1][:-1]], [1, 1], "median")
    nan = [w.copy() for w in HONEST_W[0]]
    nan[0][0, 0] = np.nan
    with pytest.raises(ValueError):
        aggregate_weights([HONEST_W[0], nan], [1, 1], "median")


def test_validation_helpers():
    bound = magnitude_bound(REF, factor=100.0)
    assert bound == pytest.approx(max(1.0, 100 * max(float(np.abs(r).max()) for r in REF)))
    assert magnitude_bound([np.zeros(3)], 100.0) == 1.0
    assert weights_violation(HONEST_W[0], REF, bound=bound) is None
    assert weights_violation(WEIGHT_ATTACKS["scaled"], REF, bound=bound) == "magnitude"
    assert weights_violation(HONEST_W[0][:-1], REF) == "tensor_count"
    assert weights_violation([w.T for w in HONEST_W[0]], REF) == "shape"
    inf = [w.copy() for w in HONEST_W[0]]
    inf[1][0] = np.inf
    assert weights_violation(inf, REF, bound=bound) == "non_finite"


def test_capped_sample_counts_bound_a_count_liar():
    n = cap_sample_counts([*[10] * H, 10_000])
    assert n.tolist() == [10, 10, 10, 10, 20]  # 2 x median
    q = fuse_logits([*HONEST, LOGIT_ATTACKS["wrong_class"]], "weighted", num_samples=[*[10] * H, 10_000])
    q_cap = fuse_logits([*HONEST, LOGIT_ATTACKS["wrong_class"]], "weighted", num_samples=n)
    assert _acc(q) < 0.1 and _acc(q_cap) > _acc(q)  # capped, the liar has 1/3 of the vote, not all of it
    out = aggregate_weights(
        [*HONEST_W, WEIGHT_ATTACKS["sign_flip"]], cap_sample_counts([*HONEST_N, 10**9]), "multi_krum"
    )
    assert _dist(out, HONEST_AVG) <= 2 * SPREAD


def test_agreement_filter_drops_models_that_disagree_with_the_ensemble():
    from server_app.engine.robust import agreement_filter

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    honest = []
    for _ in range(6):  # weak, noisy honest teachers (~70 % right)
        z = rng.normal(0, 1, (500, 10))
        right = rng.random(500) < 0.7
        z[np.arange(500)[right], y[right]] += 4.0
        honest.append(z)
    onehot = np.zeros((500, 10))
    onehot[:, 3] = 50.0
    flipped = np.zeros((500, 10))
    flipped[np.arange(500), 9 - y] = 8.0
    attackers = [onehot, rng.normal(0, 50, (500, 10)), np.zeros((500, 10)), flipped, -honest[0] * 1e3]
    keep, agree = agreement_filter(honest + attackers, factor=0.3)
    assert keep[:6].all(), agree  # every honest device kept
    assert not keep[6:].any(), agree  # every attacker dropped
    keep2, _ = agreement_filter([honest[0], onehot], factor=0.3)  # no majority with 2 devices: keep all
    assert keep2.all()
    # judged in blocks of proxy rows (bounded memory at 10,000 devices): the same answer, float16 too
    import server_app.engine.robust as robust

    full = robust.AGREEMENT_BLOCK_BYTES
    try:
        robust.AGREEMENT_BLOCK_BYTES = 11 * 10 * 8 * 7  # 7 rows per block, the last one short
        keep3, agree3 = agreement_filter([z.astype(np.float16) for z in honest + attackers[:4]] + attackers[4:],
                                         factor=0.3)  # fmt: skip
    finally:
        robust.AGREEMENT_BLOCK_BYTES = full
    assert keep3.tolist() == keep.tolist()
    np.testing.assert_allclose(agree3, agree, atol=0.01)  # float16 rounding may move a near-tie row


def test_canary_filter_judges_by_known_labels_even_without_consensus():
    """Weak, strongly non-IID honest devices (each knows 2 classes) do not agree among themselves,
    so a coordinated minority answering "3" for everything is the agreement consensus; their
    balanced accuracy on the labeled proxy rows is exactly chance and they are dropped, however
    many of the labeled rows happen to be 3s."""
    from server_app.engine.robust import agreement_filter, balanced_accuracy, canary_filter

    rng = np.random.default_rng(1)
    n, c = 300, 10
    y = rng.integers(0, c, n)
    y[:60] = 3  # many 3s among the rows: plain accuracy would reward the one-hot attackers
    honest = []
    for d in range(8):  # device d knows classes {d, d+1}: right there, noise elsewhere
        z = rng.normal(0, 1, (n, c))
        known = np.isin(y, [d % c, (d + 1) % c])
        z[np.arange(n)[known], y[known]] += 6.0
        honest.append(z)
    onehot = np.zeros((n, c))
    onehot[:, 3] = 50.0
    flipped = np.zeros((n, c))
    flipped[np.arange(n), 9 - y] = 8.0
    attackers = [onehot, onehot.copy(), flipped]
    labels = np.full(n, -1)
    labels[:: 5] = y[:: 5]  # the server knows every 5th row (60 rows)
    keep, score = canary_filter(honest + attackers, labels, factor=0.5)
    assert keep[:8].all(), score
    assert not keep[8:].any(), score
    assert balanced_accuracy(np.full(10, 3), np.arange(10))[0] == pytest.approx(0.1)
    # agreement alone cannot tell (no consensus among the honest): it keeps everyone
    keep_a, _ = agreement_filter(honest + attackers, factor=0.3)
    assert keep_a[8:].all()
    # too few labeled rows, or too few devices: nobody is judged
    few = np.full(n, -1)
    few[:5] = y[:5]
    assert canary_filter(honest + attackers, few)[0].all()
    assert canary_filter([honest[0], onehot], labels)[0].all()


def test_informedness_is_zero_for_input_blind_models_and_judges_a_device_on_its_own_classes():
    """Youden's J per class, weighted by the device's histogram: a constant or one-hot model scores
    exactly 0 whatever the class mix, a label-flipped one below 0, and a device that only ever saw
    classes 1 and 2 scores high when weighted by its histogram but near chance unweighted."""
    from server_app.engine.robust import canary_filter, informedness

    y = np.repeat(np.arange(10), 6)
    assert informedness(np.full(60, 3), y) == pytest.approx(0.0)
    assert informedness(np.full(60, 3), y, [0, 0, 0, 100, 0, 0, 0, 0, 0, 0]) == pytest.approx(0.0)
    assert informedness(9 - y, y) < -0.05
    pred = np.where(np.isin(y, [1, 2]), y, 1)  # right on 1 and 2, says "1" for everything else
    hist = [0, 30, 30, 0, 0, 0, 0, 0, 0, 0]
    assert informedness(pred, y, hist) > 0.4
    assert informedness(pred, y) < 0.2
    # in the filter: weak non-IID devices are kept by their histograms, input-blind attackers dropped
    c, rng = 10, np.random.default_rng(3)
    labels = y
    honest, hists = [], []
    for d in range(6):
        own = [d % c, (d + 3) % c]
        z = rng.normal(0, 1, (60, c))
        z[:, own[0]] += 2.0  # biased towards its own first class everywhere (non-IID)
        m = np.isin(y, own)
        z[np.arange(60)[m], y[m]] += 8.0
        honest.append(z)
        h = [0] * c
        h[own[0]], h[own[1]] = 40, 20
        hists.append(h)
    onehot = np.zeros((60, c))
    onehot[:, 3] = 50.0
    keep, score = canary_filter([*honest, onehot, onehot.copy()], labels, 0.5,
                                histograms=[*hists, [0, 0, 0, 100, 0, 0, 0, 0, 0, 0], None])
    assert keep[:6].all() and not keep[6:].any(), score


def test_update_outliers_drop_rescaled_and_sign_flipped_models_not_honest_ones():
    from server_app.engine.robust import update_outliers

    rng = np.random.default_rng(0)
    ref = [rng.normal(0, 1, (20, 10)).astype(np.float32), rng.normal(0, 1, 10).astype(np.float32)]
    honest = [[r + rng.normal(0, 0.05 * (1 + i % 3), r.shape).astype(np.float32) for r in ref] for i in range(8)]
    flipped = [-w for w in honest[0]]
    scaled = [w * np.float32(1e30) for w in honest[1]]
    keep, norms = update_outliers([*honest, flipped, scaled], ref, 4.0)
    assert keep[:8].all() and not keep[8:].any(), norms
    assert np.all(np.isfinite(norms))
    assert update_outliers([honest[0], flipped], ref)[0].all()  # two devices: no median to judge by
    # a device with 6x the median data moved 6x as far: kept only up to the count allowance (2x)
    big = [r + 5.0 * (w - r) for w, r in zip(honest[2], ref, strict=True)]
    sets, counts = [*honest, big], [100] * 8 + [600]
    assert not update_outliers(sets, ref, 4.0)[0][-1]
    assert update_outliers(sets, ref, 4.0, num_samples=counts)[0][-1]
    lie = update_outliers([*honest, flipped], ref, 4.0, num_samples=[100] * 8 + [10**6])
    assert not lie[0][-1]  # claiming 10^6 samples buys at most 2x


def test_strategy_uses_proxy_labels_only_when_given():
    """KoalaStrategy with proxy_labels drops a device whose logits are at chance on them; the
    labels never reach an assignment."""
    import torch  # noqa: F401  (the large model)

    from server_app.engine.strategies import build_strategy
    from server_app.engine.types import DeviceInfo, Result
    from server_app.models.large import build_large_model
    from server_app.policy import KoalaPolicy

    rng = np.random.default_rng(0)
    n, c = 60, 10
    proxy = rng.random((n, 8, 8, 1), np.float32)
    y = rng.integers(0, c, n)
    pol = KoalaPolicy(strategy="koala_homo", archs=["mlp_tiny"], teacher="device_logits", rkd_epochs=1,
                      large={"width": 4, "options": {"fc": 16}}, agreement_filter=None)  # fmt: skip
    large = build_large_model(pol.large, (8, 8, 1), c, 0)
    s = build_strategy(pol, large=large, proxy_x=proxy, small_factory=lambda a: None, proxy_labels=y)
    devs = [DeviceInfo(f"d{i}", "mlp_tiny", 50) for i in range(4)]
    assignments = s.configure_round(0, devs)
    assert all(not hasattr(a, "proxy_labels") for a in assignments)
    good = np.eye(c)[y] * 8.0
    onehot = np.zeros((n, c))
    onehot[:, 3] = 50.0
    results = [Result(round_id=0, device_id=f"d{i}", arch="mlp_tiny", num_samples=50, model_version=0,
                      label_histogram=[5] * c, proxy_logits=(onehot if i == 3 else good).astype(np.float32))
               for i in range(4)]  # fmt: skip
    report = s.aggregate(0, results)
    assert report.metrics["dropped_disagreeing"] == 1
    with pytest.raises(ValueError, match="proxy_labels"):
        build_strategy(pol, large=large, proxy_x=proxy, small_factory=lambda a: None, proxy_labels=y[:10])


@pytest.mark.parametrize("attack", sorted(WEIGHT_ATTACKS))
def test_cosine_rule_gives_an_opposing_update_no_weight(attack):
    """The FLTrust-like rule: an update pointing away from the median update gets weight 0, one
    pointing along it is rescaled to the median norm; the result stays with the honest average."""
    info: dict = {}
    out = aggregate_weights([*HONEST_W, WEIGHT_ATTACKS[attack]], [*HONEST_N, 10**9], "cosine", reference=REF,
                            info=info)  # fmt: skip
    assert [o.shape for o in out] == SHAPES and all(np.isfinite(o).all() for o in out)
    assert _dist(out, HONEST_AVG) <= 2 * SPREAD, (_dist(out, HONEST_AVG), SPREAD)
    if attack == "sign_flip":
        assert info["cosine"][H] < 0  # the reversed update: no weight at all
    clean = aggregate_weights(HONEST_W, HONEST_N, "cosine", reference=REF)
    assert _dist(clean, HONEST_AVG) <= SPREAD
    with pytest.raises(ValueError, match="reference"):
        aggregate_weights(HONEST_W, HONEST_N, "cosine")


def test_self_reported_histograms_are_capped_like_their_counts():
    """Class-aware fusion gives a device each class's vote share its histogram claims: a device
    claiming 10^6 samples must not own every class (it is capped as its count is)."""
    from server_app.engine.fusion import fuse_logits
    from server_app.engine.strategies.common import capped_counts, capped_histograms
    from server_app.policy import KoalaPolicy

    pol = KoalaPolicy(strategy="koala_hetero")  # count_cap 2.0
    ns = [10, 10, 10, 2_000_000]
    hists = [[10, 0], [0, 10], [5, 5], [1_000_000, 1_000_000]]
    caps = capped_counts(pol, ns)
    capped = capped_histograms(hists, ns, caps)
    assert capped[:3] == [[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]]  # honest counts untouched
    assert capped[3] == [10.0, 10.0]  # 2 x the median count (10), spread as claimed
    assert capped_histograms(None, ns, caps) is None
    # three honest devices say class 0 for row 0 and class 1 for row 1; the liar says the opposite
    honest = np.array([[4.0, -4.0], [-4.0, 4.0]])
    logits = [honest, honest, honest, -honest]
    raw = fuse_logits(logits, "class_aware", label_histograms=hists)
    fair = fuse_logits(logits, "class_aware", label_histograms=capped)
    assert raw.argmax(1).tolist() == [1, 0]  # uncapped: the liar owns both classes
    assert fair.argmax(1).tolist() == [0, 1]
