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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULES = ("mean", "weighted", "entropy", "class_aware", "group")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _normalize(w: np.ndarray) -> np.ndarray:
    s = w.sum(axis=0, keepdims=True)
    return w / np.where(s > 0, s, 1.0)


def fuse_logits(
    logits: np.ndarray | Sequence[np.ndarray],
    rule: str = "mean",
    temperature: float = 1.0,
    num_samples: Sequence[int] | None = None,
    label_histograms: Sequence[Sequence[int]] | None = None,
    groups: Sequence[str] | None = None,
    inner: str = "weighted",
) -> np.ndarray:
    """Consensus probabilities [P, C] from D teachers' logits [D, P, C] (see module doc)."""
    L = np.stack([np.asarray(x, np.float64) for x in logits])
    if L.ndim != 3:
        raise ValueError(f"logits must be [D, P, C], got {L.shape}")
    D, P, C = L.shape
    p = softmax(L, temperature)  # [D, P, C]
    n = np.ones(D) if num_samples is None else np.asarray(num_samples, np.float64)
    if rule == "mean":
        out = p.mean(axis=0)
    elif rule == "weighted":
        out = np.tensordot(n / n.sum(), p, axes=1)
    elif rule == "entropy":
        h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)  # [D, P]
        w = 1.0 - h / np.log(C) + 1e-3
        out = (_normalize(w)[..., None] * p).sum(axis=0)
    elif rule == "class_aware":
        if label_histograms is None:
            raise ValueError("class_aware fusion needs label histograms")
        hist = np.asarray(label_histograms, np.float64)  # [D, C]
        share = _normalize(hist)  # [D, C], columns sum to 1 (or 0 if nobody saw the class)
        unseen = hist.sum(axis=0) == 0
        share[:, unseen] = 1.0 / D
        out = np.einsum("dc,dpc->pc", share, p)
    elif rule == "group":
        if groups is None:
            raise ValueError("group fusion needs the group (arch) of every teacher")
        names = sorted(set(groups))
        g_probs, g_n = [], []
        for g in names:
            idx = [i for i, x in enumerate(groups) if x == g]
            ng = n[idx]
            g_probs.append(np.tensordot(ng / ng.sum(), p[idx], axes=1))
            g_n.append(ng.sum())
        gp = np.stack(g_probs)
        gw = np.asarray(g_n) if inner == "weighted" else np.ones(len(names))
        out = np.tensordot(gw / gw.sum(), gp, axes=1)
    else:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {RULES}")
    out = out / out.sum(axis=-1, keepdims=True)
    return out.astype(np.float32)
