"""Fusing several teachers' proxy outputs into one consensus soft label per proxy sample.

Every rule takes the teachers' logits [D, P, C], softens each with temperature T and returns
probabilities [P, C] (rows sum to 1). Fusion happens in probability space: averaging logits of
differently calibrated architectures lets one over-confident model dominate.

Rules (D teachers, p_d = softmax(logits_d / T)):
- "mean":        q = (1/D) sum_d p_d
- "weighted":    q = sum_d n_d p_d / sum_d n_d                      (n_d: private sample counts)
- "entropy":     q(x) = sum_d w_d(x) p_d(x) / sum_d w_d(x),  w_d(x) = 1 - H(p_d(x)) / log C + 1e-3
                 (DS-FL-style: confident teachers count more, per sample)
- "class_aware": q(x)_c ∝ sum_d s_{d,c} p_d(x)_c,  s_{d,c} = h_{d,c} / sum_d' h_{d',c}
                 (h: label histograms) — a device votes on class c in proportion to its share of
                 the class-c training data, so it does not vote on classes it never saw; rows are
                 renormalised. A class nobody saw falls back to the plain mean.
- "group":       first a sample-weighted mean inside each group (architecture), then `inner`
                 rule ("mean" or "weighted" by group sample count) across groups.

Robust rules (bound any one device's influence; see engine/robust.py). They ignore sample counts
on purpose — counts are self-reported, so weighting by them hands the vote to whoever claims most:
- "median":       q(x)_c ∝ median_d p_d(x)_c   (coordinate-wise, Yin et al. 2018; Flower FedMedian)
- "trimmed_mean": q(x)_c ∝ mean_d of p_d(x)_c after dropping the floor(trim*D) lowest and highest
                  values per coordinate (FedTrimmedAvg; trim=0.2 drops one of 5). Few devices:
                  k=0 is the plain mean (D<=4 at 0.2), a trim leaving <2 values is the median.
- "agreement":    q = sum_d a_d^2 p_d / sum_d a_d^2, a_d = fraction of proxy samples on which
                  device d's argmax equals the "median" consensus' argmax: a device that agrees
                  little with the ensemble (random, sign-flipped, constant) gets little weight.
                  Not a hard guarantee like median/trimmed_mean (a half-agreeing attacker keeps
                  weight), but keeps mean-like accuracy when every device is honest.
With f <= k attackers, every trimmed_mean coordinate (before renormalisation) lies inside the
honest devices' range — whatever the attackers send. Rows whose median is all zeros (one-hot
devices that all disagree) fall back to the mean for that row.

Non-finite logits: a NaN entry becomes 0, ±inf is clamped to the float32 range;
the per-row max shift in `softmax` keeps exp() in range for any finite value (1e30 included), so
logits are not clipped to a fixed ±k·T (that would rewrite honest confident rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from server_app.engine.pages import release_pages
from server_app.engine.probability import BLOCK_BYTES, probability_blocks, sanitize_logits, softmax
from server_app.engine.robust import coordinate_median, coordinate_trimmed_mean

RULES = ("mean", "weighted", "entropy", "class_aware", "group", "median", "trimmed_mean", "agreement")
ROBUST_RULES = ("median", "trimmed_mean", "agreement")
ROBUST_BLOCK_BYTES = BLOCK_BYTES  # working set of the robust rules (a block of proxy rows, every device)


def _row_normalize(q: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of q [P, C] scaled to sum 1; a row summing to 0 takes the fallback row."""
    s = q.sum(axis=-1, keepdims=True)
    return np.where(s > 0, q / np.where(s > 0, s, 1.0), fallback)


def _normalize(w: np.ndarray) -> np.ndarray:
    s = w.sum(axis=0, keepdims=True)
    return w / np.where(s > 0, s, 1.0)


def fuse_logits(
    logits: np.ndarray | Sequence[np.ndarray],
    rule: str = "mean",
    temperature: float = 1.0,
    num_samples: Sequence[float] | np.ndarray | None = None,
    label_histograms: Sequence[Sequence[float] | None] | None = None,
    groups: Sequence[str] | None = None,
    inner: str = "weighted",
    trim: float = 0.2,
) -> np.ndarray:
    """Consensus probabilities [P, C] float32 (rows sum to 1) from D teachers' logits [D, P, C].

    rule: one of RULES (see module doc); trim: the per-end fraction of "trimmed_mean".

    The linear rules (all but ROBUST_RULES) are folded in one teacher at a time: memory O(P x C)
    whatever D is (a 10,000-device round of 5,000 x 10 logits stacked as float64 with its softmax
    was ~8 GB). The robust rules need every teacher's value per coordinate, which depends on one
    proxy row at a time: they judge blocks of rows (`probability.probability_blocks`, a bounded
    working set), and "agreement" then folds the teachers in with their agreement weights."""
    if rule not in ROBUST_RULES:
        return _fuse_linear(logits, rule, temperature, num_samples, label_histograms, groups, inner)
    D = len(logits)
    if D == 0:
        raise ValueError("logits must be [D, P, C] with D >= 1")
    P = np.shape(logits[0])[0] if np.ndim(logits[0]) == 2 else 0
    out = np.empty((P, np.shape(logits[0])[-1])) if rule != "agreement" else None
    hits = np.zeros(D)
    for r0, p in probability_blocks(logits, temperature, budget=ROBUST_BLOCK_BYTES):
        n = p.shape[1]
        if rule == "median":
            out[r0 : r0 + n] = _row_normalize(coordinate_median(p), p.mean(axis=0))  # type: ignore[index]
        elif rule == "trimmed_mean":
            out[r0 : r0 + n] = _row_normalize(coordinate_trimmed_mean(p, trim), p.mean(axis=0))  # type: ignore[index]
        else:  # agreement: each device's share of rows on which it agrees with the median consensus
            ref = _row_normalize(coordinate_median(p), p.mean(axis=0)).argmax(axis=-1)  # [rows]
            hits += (p.argmax(axis=-1) == ref[None, :]).sum(axis=1)
    if rule == "agreement":
        a = hits / max(1, P)  # [D]
        w = a**2 if np.any(a > 0) else np.ones(D)
        return _fuse_linear(logits, "weighted", temperature, w, None, None, inner)  # sum_d w_d p_d / sum_d w_d
    assert out is not None
    fused: np.ndarray = out / out.sum(axis=-1, keepdims=True)
    return fused.astype(np.float32)


def _fuse_linear(
    logits: np.ndarray | Sequence[np.ndarray],
    rule: str,
    temperature: float,
    num_samples: Sequence[float] | np.ndarray | None,
    label_histograms: Sequence[Sequence[float] | None] | None,
    groups: Sequence[str] | None,
    inner: str,
) -> np.ndarray:
    """fuse_logits for mean / weighted / entropy / class_aware / group as running sums over the
    teachers: each rule is sum_d w_d * p_d / sum_d w_d with weights known per teacher (entropy:
    per row), so nothing [D, P, C] is ever built. Same values as the stacked form up to the order
    of float64 additions."""
    D = len(logits)
    if D == 0:
        raise ValueError("logits must be [D, P, C] with D >= 1")
    n = np.ones(D) if num_samples is None else np.asarray(num_samples, np.float64)
    if rule == "class_aware":
        if label_histograms is None:
            raise ValueError("class_aware fusion needs label histograms")
        hist = np.asarray(label_histograms, np.float64)  # [D, C]
        share = _normalize(hist)  # columns sum to 1 (or 0 if nobody saw the class)
        share[:, hist.sum(axis=0) == 0] = 1.0 / D
    elif rule == "group":
        if groups is None:
            raise ValueError("group fusion needs the group (arch) of every teacher")
        if len(groups) != D:
            raise ValueError(f"{len(groups)} groups for {D} teachers")
    elif rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {RULES}")
    acc: np.ndarray | None = None  # sum of weighted probabilities [P, C]
    wsum: np.ndarray | float = 0.0  # sum of weights (entropy: per row [P, 1])
    by_group: dict[str, list[Any]] = {}  # group -> [sum n_d p_d, sum n_d]
    shape: tuple[int, ...] = ()
    for d, x in enumerate(logits):
        z = sanitize_logits(np.asarray(x))
        release_pages(x)  # a spilled teacher (file-mapped) leaves the process once read
        if z.ndim != 2:
            raise ValueError(f"logits must be [D, P, C], got a teacher of shape {z.shape}")
        p = softmax(z, temperature)  # [P, C]
        if d and p.shape != shape:
            raise ValueError(f"teacher {d} has logits of shape {p.shape}, teacher 0 {shape}")
        shape = p.shape
        if rule == "group":
            g = by_group.setdefault(groups[d], [np.zeros_like(p), 0.0])  # type: ignore[index]
            g[0] += n[d] * p
            g[1] += n[d]
            continue
        if rule == "mean":
            w: np.ndarray | float = 1.0
        elif rule == "weighted":
            w = float(n[d])
        elif rule == "entropy":
            h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1, keepdims=True)  # [P, 1]
            w = 1.0 - h / np.log(p.shape[-1]) + 1e-3
        else:  # class_aware: the teacher's share of each class
            w = share[d][None, :]
        acc = w * p if acc is None else acc + w * p
        if rule != "class_aware":
            wsum = wsum + w
    if rule == "group":
        names = sorted(by_group)
        gw = np.asarray([by_group[g][1] for g in names]) if inner == "weighted" else np.ones(len(names))
        out = sum((gw[i] / gw.sum()) * (by_group[g][0] / by_group[g][1]) for i, g in enumerate(names))
    elif rule == "class_aware":
        out = acc
    else:
        assert acc is not None  # D >= 1 teachers were folded in
        out = acc / wsum
    out = np.asarray(out, np.float64)
    fused: np.ndarray = out / out.sum(axis=-1, keepdims=True)
    return fused.astype(np.float32)
