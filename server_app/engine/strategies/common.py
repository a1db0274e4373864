"""Helpers shared by strategies: FedAvg."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from server_app.engine.types import Result

if TYPE_CHECKING:
    from server_app.policy import KoalaPolicy


def weights_of(r: Result) -> list[np.ndarray]:
    """A result's weights, for results already kept only if they carry weights."""
    if r.weights is None:
        raise ValueError(f"device {r.device_id}: the result carries no weights")
    return r.weights


def logits_of(r: Result) -> np.ndarray:
    """A result's proxy logits, for results already kept only if they carry logits."""
    if r.proxy_logits is None:
        raise ValueError(f"device {r.device_id}: the result carries no proxy logits")
    return r.proxy_logits


def histogram_of(r: Result) -> list[int]:
    """A result's label histogram, where the round needs one."""
    if r.label_histogram is None:
        raise ValueError(f"device {r.device_id}: the result carries no label histogram")
    return r.label_histogram


def fedavg(weight_sets: Sequence[list[np.ndarray]], num_samples: Sequence[float]) -> list[np.ndarray]:
    """Sample-count weighted average of weight lists (McMahan et al.), folded in one device at a
    time (memory of one model, not of the fleet; the same additions in the same order as a sum
    over the stacked devices)."""
    if not weight_sets:
        raise ValueError("nothing to average")
    from server_app.engine.pages import release_pages

    n = np.asarray(num_samples, np.float64)
    n = n / n.sum()
    acc: list[np.ndarray] | None = None
    for wi, ws in zip(n, weight_sets, strict=True):
        terms = [wi * np.asarray(w, np.float64) for w in ws]
        acc = terms if acc is None else [a + t for a, t in zip(acc, terms, strict=True)]
        for w in ws:
            release_pages(w)
    assert acc is not None
    return [a.astype(np.float32) for a in acc]


def average_weights(policy: KoalaPolicy, weight_sets: Sequence[list[np.ndarray]], num_samples: Sequence[int],
                    reference: list[np.ndarray] | None = None) -> list[np.ndarray]:  # fmt: skip
    """The policy's weight rule (`weight_rule`, `clip_factor`, `count_cap`): sample-weighted FedAvg
    on capped counts by default (one device claiming 10^6 samples must not own the average);
    median, trimmed mean or Krum bound any one device's influence (server_app.engine.robust)."""
    ns = capped_counts(policy, num_samples)
    if policy.weight_rule == "fedavg" and policy.clip_factor is None:
        return fedavg(weight_sets, ns)
    from server_app.engine.robust import aggregate_weights

    return aggregate_weights(weight_sets, ns, policy.weight_rule, reference=reference,
                             clip_factor=policy.clip_factor)  # fmt: skip


def without_update_outliers(policy: KoalaPolicy, results: Sequence[Result],
                            reference: list[np.ndarray] | None) -> tuple[list[Result], list[str]]:
    """The results whose weight update is within `outlier_factor` x the median update norm, and the
    ids of the devices dropped (policy `outlier_factor`; None or no reference: all kept)."""
    if policy.outlier_factor is None or reference is None or not results:
        return list(results), []
    from server_app.engine.robust import update_outliers

    keep, _norms = update_outliers([weights_of(r) for r in results], reference, policy.outlier_factor,
                                   num_samples=[r.num_samples for r in results],
                                   max_allowance=policy.count_cap if policy.count_cap is not None else 2.0)
    return ([r for r, k in zip(results, keep, strict=True) if k],
            [r.device_id for r, k in zip(results, keep, strict=True) if not k])  # fmt: skip


def capped_counts(policy: KoalaPolicy, num_samples: Sequence[float]) -> list[float]:
    """Sample counts as the policy trusts them (`count_cap` x median at most)."""
    if policy.count_cap is None or not len(num_samples):
        return [float(n) for n in num_samples]
    from server_app.engine.robust import cap_sample_counts

    capped: list[float] = cap_sample_counts(num_samples, policy.count_cap).tolist()
    return capped


def capped_histograms(hists: Sequence[Sequence[int] | None] | None, num_samples: Sequence[float],
                      capped: Sequence[float]) -> list[list[float] | None] | None:  # fmt: skip
    """Label histograms scaled as their counts were capped (`capped_counts`): a histogram is as
    self-reported as the count it sums to. Class-aware fusion gives a device the share of each
    class's votes its histogram claims; uncapped, 4 of 20 devices claiming 10^6 label-flipped
    samples took every class (`bench/attacks.py`, no canary rows: 4 % accuracy)."""
    if hists is None:
        return None
    out: list[list[float] | None] = []
    for h, n, c in zip(hists, num_samples, capped, strict=True):
        if h is None:
            out.append(None)
            continue
        f = float(c) / float(n) if n and float(n) > float(c) else 1.0
        out.append([float(v) * f for v in h])
    return out
