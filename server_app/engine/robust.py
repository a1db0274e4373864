"""Byzantine-robust aggregation: no single device can move the result arbitrarily far.

Pure numpy, float64 accumulation, deterministic (no randomness; ties broken by device order).

Coordinate-wise statistics (Yin et al. 2018, "Byzantine-robust distributed learning"; Flower's
FedMedian / FedTrimmedAvg):
- `coordinate_median(x)`: per coordinate, the median over devices (axis 0).
- `coordinate_trimmed_mean(x, trim)`: per coordinate, drop the k = floor(trim * D) smallest and
  k largest values, average the rest. With f <= k attackers every output coordinate lies inside
  the [min, max] range of the honest values, whatever the attackers send. Too few devices for a
  trim (2k >= D) degrades to the median; k = 0 (e.g. D <= 4 at trim 0.2) is the plain mean.
These ignore sample counts on purpose: counts are self-reported, so weighting by them lets one
device claim n = 10^9 and own the average.

Krum / Multi-Krum (Blanchard et al. 2017; Flower's Krum): score each device by the sum of squared
distances to its D - f - 2 nearest neighbours, keep the m lowest-scoring devices and average them
(m = 1: Krum). Needs D >= 2f + 3 for its guarantee; f defaults to the largest such value.

Update clipping: with the current global weights as `reference`, each device's update
u_i = w_i - reference (all tensors as one vector) is scaled down to norm <= bound, where bound is
`clip_norm` or `clip_factor` x the median update norm. This bounds a scaled attack (w x 1e30) to
the size of an honest update before any rule sees it.

Validation helpers for ingestion: `magnitude_bound(reference, factor)` and `weights_violation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from server_app.engine.pages import release_pages
from server_app.engine.probability import BLOCK_BYTES, probability_blocks
from server_app.policy import WEIGHT_RULES  # the one list of rule names (policy validates against it)


# --------------------------------------------------------------------------- coordinate rules
def trim_count(num: int, trim: float) -> int:
    """How many values to drop from EACH end for `num` devices at fraction `trim` (Flower's int(beta*n)),
    capped so at least one value is left: (num - 1) // 2 at most."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    return min(int(np.floor(trim * num)), (num - 1) // 2)


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """Median over axis 0 (devices), float64. Even D: the mean of the two middle values."""
    med: np.ndarray = np.median(np.asarray(x, np.float64), axis=0)
    return med


def coordinate_trimmed_mean(x: np.ndarray, trim: float = 0.2) -> np.ndarray:
    """Mean over axis 0 after dropping the k = trim_count(D, trim) smallest and largest values
    per coordinate. If that leaves <= 2 values with k > 0 (2k + 2 > D, e.g. D = 3), the median."""
    a = np.asarray(x, np.float64)
    d = a.shape[0]
    k = trim_count(d, trim)
    if k == 0:
        mean: np.ndarray = a.mean(axis=0)
        return mean
    if d - 2 * k <= 1:
        return coordinate_median(a)
    s = np.sort(a, axis=0)
    trimmed: np.ndarray = s[k : d - k].mean(axis=0)
    return trimmed


# ------------------------------------------------------------------------------- helpers
def _flat(ws: Sequence[np.ndarray]) -> np.ndarray:
    """One device's tensors as one float64 vector (a spilled device's pages leave the process)."""
    v = np.concatenate([np.asarray(w, np.float64).ravel() for w in ws]) if len(ws) else np.zeros(0)
    for w in ws:
        release_pages(w)
    return v


def _update_norm(ws: Sequence[np.ndarray], ref: np.ndarray) -> float:
    """`_row_norms` of one device's update, without stacking the fleet's."""
    return float(_row_norms((_flat(ws) - ref)[None, :])[0])


def _unflat(v: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    out, i = [], 0
    for w in like:
        n = int(np.asarray(w).size)
        out.append(v[i : i + n].reshape(np.shape(w)))
        i += n
    return out


def _row_norms(u: np.ndarray) -> np.ndarray:
    """L2 norm of each row in float64 without overflow for huge values (each row scaled by its max
    |value| first): a device sending 1e300 must get a finite, comparable norm."""
    scale = np.max(np.abs(u), axis=1) if u.size else np.zeros(len(u))
    safe = np.where(scale > 0, scale, 1.0)
    norms: np.ndarray = np.linalg.norm(u / safe[:, None], axis=1) * scale
    return norms


def _finite_f32(v: np.ndarray) -> np.ndarray:
    """float64 result -> float32 that cannot overflow to inf (clamped to the float32 range)."""
    big = float(np.finfo(np.float32).max)
    clipped: np.ndarray = np.clip(v, -big, big)
    return clipped.astype(np.float32)


def cap_sample_counts(num_samples: Sequence[float], factor: float = 2.0) -> np.ndarray:
    """Self-reported sample counts capped at `factor` x their median (float64).

    Sample-weighted rules (FedAvg, "weighted" fusion) trust each device's count; one device claiming
    10^9 samples owns the result. Capped, its weight is at most factor x median / sum — about
    factor / D. Honest counts above the cap lose a little weight; counts below are unchanged."""
    n = np.asarray(num_samples, np.float64)
    if n.size == 0:
        return n
    return np.minimum(n, float(factor) * float(np.median(n)))


def magnitude_bound(reference: Sequence[np.ndarray], factor: float = 100.0) -> float:
    """Largest |value| a device's weights may hold, derived from the current global weights:
    max(1, factor * max|reference|). Honest training moves weights by a few x at most in a round;
    a device sending 1e30 is rejected by `weights_violation(w, bound=magnitude_bound(ref))`."""
    m = max((float(np.max(np.abs(np.asarray(r, np.float64)))) for r in reference if np.size(r)), default=0.0)
    return max(1.0, float(factor) * m)


def weights_violation(
    weights: Sequence[np.ndarray],
    reference: Sequence[np.ndarray] | None = None,
    *,
    bound: float | None = None,
) -> str | None:
    """Why one device's weight list must be rejected, or None if it passes.

    Checks: same number of tensors and shapes as `reference` (when given), every value finite,
    max |value| <= `bound` (when given; see `magnitude_bound`). Reasons are short stable codes:
    "tensor_count", "shape", "non_finite", "magnitude"."""
    if reference is not None:
        if len(weights) != len(reference):
            return "tensor_count"
        if any(np.shape(w) != np.shape(r) for w, r in zip(weights, reference, strict=True)):
            return "shape"
    for w in weights:
        a = np.asarray(w)
        if a.size == 0:
            continue
        bad = not np.all(np.isfinite(a))
        big = not bad and bound is not None and float(np.max(np.abs(a.astype(np.float64)))) > bound
        release_pages(w)
        if bad:
            return "non_finite"
        if big:
            return "magnitude"
    return None


def clip_updates(
    vectors: np.ndarray, reference: np.ndarray, clip_norm: float | None = None, clip_factor: float = 2.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Scale each row's update (row - reference) to L2 norm <= bound.

    bound = clip_norm if given, else clip_factor * median update norm (robust: one attacker cannot
    raise the median). Returns (clipped rows [D, N] float64, update norms before clipping [D], bound)."""
    u = vectors - reference[None, :]
    norms = _row_norms(u)
    bound = float(clip_norm) if clip_norm is not None else float(clip_factor) * float(np.median(norms))
    factors = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    return reference[None, :] + u * factors[:, None], norms, bound


def _pairwise_sq(v: np.ndarray) -> np.ndarray:
    """Squared L2 distances between rows, by explicit differences (the Gram-matrix shortcut cancels
    catastrophically when one row is ~1e30). Rows are scaled by a common factor so squares of huge
    values cannot overflow float64; distances are only compared, so the scale does not matter."""
    d = len(v)
    s = float(np.max(np.abs(v))) if v.size else 0.0
    w = v / s if s > 0 and np.isfinite(s) else v
    out = np.zeros((d, d))
    for i in range(d):
        diff = w[i + 1 :] - w[i]
        out[i, i + 1 :] = np.einsum("ij,ij->i", diff, diff)
    sq: np.ndarray = out + out.T
    return sq


def krum_select(
    vectors: np.ndarray, num_malicious: int | None = None, num_keep: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the `num_keep` devices with the lowest Krum scores (ascending; ties by index) and all scores.

    score_i = sum of squared distances to its D - f - 2 nearest other devices (at least 1 neighbour).
    f = num_malicious, default max(0, (D - 3) // 2), the most Krum tolerates (D >= 2f + 3)."""
    d = len(vectors)
    f = max(0, (d - 3) // 2) if num_malicious is None else int(num_malicious)
    nb = max(1, d - f - 2)
    dist = _pairwise_sq(vectors)
    scores = np.zeros(d)
    for i in range(d):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[: min(nb, len(others))].sum() if len(others) else 0.0
    keep = np.argsort(scores, kind="stable")[: max(1, min(num_keep, d))]
    return keep, scores


# ------------------------------------------------------------------------------ the entry point
def aggregate_weights(
    weight_sets: Sequence[Sequence[np.ndarray]],
    num_samples: Sequence[float] | None,
    rule: str = "fedavg",
    *,
    reference: Sequence[np.ndarray] | None = None,
    clip_norm: float | None = None,
    clip_factor: float | None = 2.0,
    trim: float = 0.2,
    num_malicious: int | None = None,
    num_keep: int | None = None,
    info: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """Aggregate D devices' weight lists into one (float32 tensors, the shapes of the first set).

    rule: "fedavg" (sample-weighted mean, as strategies.common.fedavg), "median", "trimmed_mean"
    (fraction `trim` from each end per coordinate), "krum" (the single most central device),
    "multi_krum" (sample-weighted mean of the `num_keep` most central; default D - f), "cosine"
    (FLTrust-like, Cao et al. 2021, with the coordinate-wise median update as the trusted direction:
    each update weighted by its sample count (at most 2 x the median) x max(0, cosine with that
    direction) and rescaled to
    the median update norm, so an update pointing away from the majority counts for nothing;
    needs `reference`).
    reference: the current global weights. When given, every device's update (w_i - reference) is
    clipped to norm <= clip_norm, or clip_factor x the median update norm when clip_norm is None
    (clip_factor=None and clip_norm=None: no clipping). Without a reference nothing is clipped.
    num_malicious: Krum's f (default max(0, (D-3)//2)).
    info: optional dict, filled with diagnostics: "rule", "num_devices", "update_norms", "clip_bound",
    "clipped" (device indices), "selected" (Krum indices), "scores" (Krum).

    Shapes must agree (reject bad devices first with `weights_violation`); non-finite values raise.
    """
    if not weight_sets:
        raise ValueError("nothing to aggregate")
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {rule!r}; known: {WEIGHT_RULES}")
    like = list(weight_sets[0])
    for i, ws in enumerate(weight_sets):
        reason = weights_violation(ws, like)
        if reason is not None:
            raise ValueError(f"device {i}: {reason}")
    d = len(weight_sets)
    n = np.ones(d) if num_samples is None else np.asarray(num_samples, np.float64)
    if n.shape != (d,) or np.any(n < 0) or not np.all(np.isfinite(n)) or n.sum() <= 0:
        raise ValueError(f"num_samples must be {d} non-negative counts with a positive sum")
    if rule == "fedavg":  # a mean needs no [D, N] stack: fold the devices in one at a time
        return _fedavg_streaming(weight_sets, n, reference, clip_norm, clip_factor, info)
    if rule in ("median", "trimmed_mean"):  # per coordinate: a block of coordinates at a time
        return _coordinatewise_blocked(weight_sets, rule, trim, reference, clip_norm, clip_factor, info)
    # cosine and Krum need every (clipped) device vector at once: [D, N] float64
    cref, factors, clip = _clip_plan(weight_sets, like, reference, clip_norm, clip_factor)
    v = np.stack([_device_vector(ws, cref, None if factors is None else float(factors[i]))
                  for i, ws in enumerate(weight_sets)])  # fmt: skip
    diag: dict[str, Any] = {"rule": rule, "num_devices": d, **clip}
    ref = cref if cref is not None else (_flat(reference) if reference is not None else None)
    if rule == "cosine":
        if reference is None:
            raise ValueError("the cosine rule needs the reference (current global) weights")
        assert ref is not None  # cref, or the flattened reference
        u = v - ref[None, :]
        direction = coordinate_median(u)
        unorm = np.linalg.norm(u, axis=1)
        dnorm = float(np.linalg.norm(direction))
        cos = (u @ direction) / np.where(unorm * dnorm > 0, unorm * dnorm, 1.0)
        trust = np.maximum(cos, 0.0) * np.minimum(n, 2.0 * float(np.median(n)))  # counts bounded here too
        target = float(np.median(unorm))
        scaled = u * (target / np.where(unorm > 0, unorm, 1.0))[:, None]
        out = ref + (np.tensordot(trust / trust.sum(), scaled, axes=1) if trust.sum() > 0 else direction)
        diag.update(cosine=cos.tolist())
    elif rule == "median":
        out = coordinate_median(v)
    elif rule == "trimmed_mean":
        out = coordinate_trimmed_mean(v, trim)
    else:
        f = max(0, (d - 3) // 2) if num_malicious is None else int(num_malicious)
        keep_n = 1 if rule == "krum" else (num_keep if num_keep is not None else max(1, d - f))
        keep, scores = krum_select(v, f, keep_n)
        nk = n[keep]
        out = np.tensordot(nk / nk.sum(), v[keep], axes=1) if nk.sum() > 0 else v[keep].mean(axis=0)
        diag.update(selected=keep.tolist(), scores=scores.tolist())
    if info is not None:
        info.update(diag)
    return [_finite_f32(t) for t in _unflat(out, like)]


def _clip_plan(weight_sets: Sequence[Sequence[np.ndarray]], like: Sequence[np.ndarray],
               reference: Sequence[np.ndarray] | None, clip_norm: float | None,
               clip_factor: float | None) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """(flat reference, per-device clip factors, diagnostics) of `clip_updates`, one device at a
    time (no [D, N] stack): factors None when nothing is clipped."""
    if reference is None:
        return None, None, {}
    if weights_violation(reference, like) is not None:
        raise ValueError("reference does not match the devices' tensors (or is non-finite)")
    if clip_norm is None and clip_factor is None:
        return None, None, {}
    ref = _flat(reference)
    norms = np.array([_update_norm(ws, ref) for ws in weight_sets])
    cf = clip_factor if clip_factor is not None else 2.0
    bound = float(clip_norm) if clip_norm is not None else float(cf) * float(np.median(norms))
    factors = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    return ref, factors, {"update_norms": norms.tolist(), "clip_bound": bound,
                          "clipped": np.flatnonzero(norms > bound).tolist()}  # fmt: skip


def _device_vector(ws: Sequence[np.ndarray], ref: np.ndarray | None, factor: float | None) -> np.ndarray:
    """One device's weights as a vector, clipped as `clip_updates` clips its row (same operations)."""
    v = _flat(ws)
    return v if ref is None or factor is None else ref + (v - ref) * factor


def _fedavg_streaming(weight_sets: Sequence[Sequence[np.ndarray]], n: np.ndarray, reference: Sequence[np.ndarray] | None,
                      clip_norm: float | None, clip_factor: float | None,
                      info: dict[str, Any] | None) -> list[np.ndarray]:  # fmt: skip
    """aggregate_weights' "fedavg" (with clipping against `reference` as `clip_updates` does) as a
    running sum: memory O(N) whatever D is (the [D, N] float64 stack of 10,000 devices of a 9k-weight
    model was 720 MB, twice with the clipped copy). Two passes when clipping (norms, then the sum)."""
    like = list(weight_sets[0])
    ref, factors, clip = _clip_plan(weight_sets, like, reference, clip_norm, clip_factor)
    w = n / n.sum()
    out: np.ndarray | None = None
    for i, ws in enumerate(weight_sets):
        v = _device_vector(ws, ref, None if factors is None else float(factors[i]))
        out = w[i] * v if out is None else out + w[i] * v
    if info is not None:
        info.update({"rule": "fedavg", "num_devices": len(weight_sets), **clip})
    assert out is not None
    return [_finite_f32(t) for t in _unflat(out, like)]


def _coordinatewise_blocked(weight_sets: Sequence[Sequence[np.ndarray]], rule: str, trim: float,
                            reference: Sequence[np.ndarray] | None, clip_norm: float | None, clip_factor: float | None,
                            info: dict[str, Any] | None) -> list[np.ndarray]:  # fmt: skip
    """aggregate_weights' "median" / "trimmed_mean" over blocks of coordinates: each coordinate's
    statistic needs every device's value of that coordinate only, so a block of columns at a time
    keeps the working set within BLOCK_BYTES however many devices there are (the [D, N] stack was
    720 MB at 10,000 devices of 9k weights). Same values as the stacked rule."""
    like = list(weight_sets[0])
    d = len(weight_sets)
    ref, factors, clip = _clip_plan(weight_sets, like, reference, clip_norm, clip_factor)
    total = sum(int(np.asarray(w).size) for w in like)
    out = np.empty(total)
    step = max(1, BLOCK_BYTES // max(1, d * 8))
    for c0 in range(0, total, step):
        k = min(step, total - c0)
        blk = np.empty((d, k))
        for i, ws in enumerate(weight_sets):
            blk[i] = _device_vector(ws, ref, None if factors is None else float(factors[i]))[c0 : c0 + k]
        out[c0 : c0 + k] = coordinate_median(blk) if rule == "median" else coordinate_trimmed_mean(blk, trim)
    if info is not None:
        info.update({"rule": rule, "num_devices": d, **clip})
    return [_finite_f32(t) for t in _unflat(out, like)]


def update_outliers(weight_sets: Sequence[Sequence[np.ndarray]], reference: Sequence[np.ndarray],
                    factor: float = 4.0, min_devices: int = 3, num_samples: Sequence[float] | None = None,
                    max_allowance: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Which devices to keep: those whose update (w_i - reference, all tensors as one vector) is at
    most `factor` x the median update norm (with >= `min_devices` devices; else everyone).

    Why drop rather than clip: clipping shortens a sign-flipped or rescaled model to 2 x the median
    norm but keeps its direction, and four such devices pulling the same way outweigh sixteen honest
    non-IID updates that partly cancel (measured on digits, 4 of 20 sign-flipped: update norms 17-24
    against honest 1.0-1.9). Honest updates from the same starting point differ by a small factor
    (local data size, learning rate); a model that is not a few local steps from the global one is not
    an update. A device with more data takes more local steps and moves further: with
    `num_samples` its allowance is scaled by n_i / median n, clipped to [1, max_allowance] (so a
    device claiming 10^6 samples gets at most `max_allowance` x, as the count cap gives its weight).
    Returns (keep mask [D] bool, norms [D])."""
    d = len(weight_sets)
    if d == 0:
        return np.zeros(0, bool), np.zeros(0)
    ref = _flat(reference)
    norms = np.array([_update_norm(ws, ref) for ws in weight_sets])  # one device at a time, no [D, N] stack
    if d < min_devices:
        return np.ones(d, bool), norms
    med = float(np.median(norms))
    allowance = np.ones(d)
    if num_samples is not None:
        n = np.asarray(num_samples, np.float64)
        mn = float(np.median(n))
        if mn > 0:
            allowance = np.clip(n / mn, 1.0, float(max_allowance))
    keep = norms <= float(factor) * med * allowance if med > 0 else np.ones(d, bool)
    return keep, norms


# --------------------------------------------------------------------------- agreement filter
AGREEMENT_MIN_DEVICES = 3  # fewer devices: no majority to call anyone an outlier against


AGREEMENT_BLOCK_BYTES = BLOCK_BYTES  # the agreement filter's working set (probabilities of a block of proxy rows)


def _read_known(z: np.ndarray, known: np.ndarray) -> np.ndarray:
    rows: np.ndarray = np.asarray(z)[known]
    release_pages(z)
    return rows


def agreement_filter(logits: Sequence[np.ndarray], factor: float = 0.5, min_devices: int = AGREEMENT_MIN_DEVICES,
                     min_consensus: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Which devices to keep, judged by what their models say on the shared proxy set.

    Each device's predictions (argmax of its logits on the round's proxy rows) are compared with
    the ensemble's consensus, the argmax of the coordinate-wise median of all devices'
    probabilities (a majority cannot be moved by a minority). A device agreeing on fewer than
    `factor` x the median device's agreement is dropped: sign-flipped, random, one-hot, constant
    or label-flipped models land near chance (~1/C) while honest non-IID devices stay near the
    median. With fewer than `min_devices` devices there is no majority: everyone is kept.
    Returns (keep mask [D] bool, agreements [D])."""

    d = len(logits)
    if d == 0:
        return np.zeros(0, bool), np.zeros(0)
    rows = np.shape(logits[0])[0]
    # The consensus of a proxy row depends on that row only: judge blocks of rows, so the working
    # set stays within AGREEMENT_BLOCK_BYTES however many devices there are (probability_blocks).
    hits = np.zeros(d)
    for _r0, p in probability_blocks(logits, budget=AGREEMENT_BLOCK_BYTES):
        votes = p.argmax(-1)  # [D, rows]
        consensus = np.median(p, axis=0, overwrite_input=True).argmax(-1)  # [rows]; partitions p in place
        hits += (votes == consensus[None, :]).sum(axis=1)
    agree = hits / max(1, rows)  # [D]
    med = float(np.median(agree))
    if d < min_devices or med < min_consensus:
        # no majority, or honest devices do not agree among themselves yet (early rounds of a
        # strongly non-IID fleet): there is no consensus to call anyone an outlier against
        return np.ones(d, bool), agree
    keep = agree >= float(factor) * med
    if not keep.any():  # cannot happen with factor <= 1 (the median device passes); be safe anyway
        keep[:] = True
    return keep, agree


CANARY_MIN_ROWS = 10  # fewer labeled rows in a round: scores too noisy to drop anyone on
CANARY_CHANCE_MARGIN = 0.05  # a device must beat chance (informedness 0) by this much


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(mean recall over the classes present in `y`, how many classes that is). A model that
    answers one class for everything scores exactly 1/K however often that class occurs."""
    classes = np.unique(y)
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes])), len(classes)


def informedness(pred: np.ndarray, y: np.ndarray, weights: Sequence[float] | None = None) -> float:
    """Class-weighted one-vs-rest informedness (Youden's J = recall - false-positive rate) over the
    classes present in `y`, weighted by `weights[class]` (a device's label histogram: the classes it
    says it trained on), uniform when `weights` is None or puts no mass on those classes.

    Chance is 0 for any model that ignores its input (constant, one-hot, random: recall and
    false-positive rate are equal), negative for a label-flipped one, and an honest device that saw
    only a few classes scores on exactly those: its skill is judged where it claims to have it, so
    non-IID honesty is not mistaken for an attack."""
    classes = np.unique(y)
    j = np.array([np.mean(pred[y == c] == c) - (np.mean(pred[y != c] == c) if np.any(y != c) else 0.0)
                  for c in classes])  # fmt: skip
    w = np.ones(len(classes)) if weights is None else np.asarray(weights, np.float64)[classes]
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if w.sum() <= 0:
        w = np.ones(len(classes))
    return float(np.dot(w, j) / w.sum())


def canary_filter(logits: Sequence[np.ndarray], labels: np.ndarray, factor: float = 0.7,
                  min_devices: int = AGREEMENT_MIN_DEVICES, min_rows: int = CANARY_MIN_ROWS,
                  margin: float = CANARY_CHANCE_MARGIN,
                  histograms: Sequence[Sequence[float] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which devices to keep, judged by their skill on the proxy rows whose labels the server
    knows ("canaries": a few labeled rows among the unlabeled proxy, which devices cannot tell apart).

    Why, next to `agreement_filter`: agreement needs honest devices to agree among themselves, and
    in the first rounds of a strongly non-IID fleet they do not; a coordinated minority (every
    attacker answering the same class) then *is* the consensus and, once distilled, stays it. A
    score against known labels is absolute: an attacker cannot raise the honest devices' scores, so
    the median device's is an honest one while attackers are a minority. The score is
    `informedness` weighted by the device's own label histogram (`histograms[i]`; uniform if None):
    constant, one-hot, random and sign-flipped models score about 0, label-flipped ones below it,
    and an honest non-IID device scores on the classes it trained on (measured on digits, 4 of 20
    attackers: honest 0.3-0.9 from round 2 on, random/sign-flipped weights <= 0.1; plain balanced
    accuracy left both near 0.15 there, since a device knowing 3 classes cannot beat 0.3 on 10).
    A device is dropped below max(margin, factor x the median device's score). `labels` holds the
    round's proxy rows' labels, -1 where unknown. Returns (keep mask [D] bool, scores [D], NaN when
    not judged)."""
    d = len(logits)
    known = np.asarray(labels) >= 0
    if d == 0 or d < min_devices or int(known.sum()) < min_rows:
        return np.ones(d, bool), np.full(d, np.nan)
    y = np.asarray(labels)[known]
    hs = histograms if histograms is not None else [None] * d
    score = np.array([informedness(_read_known(z, known).argmax(-1), y, h) for z, h in zip(logits, hs, strict=True)])
    floor = max(float(margin), float(factor) * float(np.median(score)))
    keep = score >= floor
    if not keep.any():  # nobody beats chance yet (a fresh fleet): no basis to prefer anyone
        keep[:] = True
    return keep, score
