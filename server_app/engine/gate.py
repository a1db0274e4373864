"""Model gate: accept or roll back a round's reverse distillation of the large model.

Robust fusion bounds what one device can do to the soft labels; the gate is the last check, on the
large model itself, before a new version is published (forward-KD teacher, checkpoint, API):

    snap = snapshot(large)                                   # before reverse_distill
    before = predict_logits(large, x_eval)                   # pre-round outputs on the slice
    reverse_distill(large, ...)
    d = gate.evaluate(before, large, x_eval, y_eval)         # y_eval optional
    if not d.ok:
        restore(large, snap)                                 # the round leaves the model untouched

Rejected when (first match is the reason):
- "non_finite_params": any parameter/buffer is NaN or inf;
- "non_finite_outputs": any output logit on the slice is NaN or inf;
- "collapse": the new model predicts one class for more than `collapse_frac` of the slice while the
  previous one did not (and, with labels, that class is not that common in the labels);
- "accuracy_drop": accuracy fell by more than `tolerance` (absolute) vs the previous model — only
  once the previous model is past chance (acc >= 1/C + chance_margin). Round 0's previous model
  is random (He init, last layer std 0.01: near-uniform outputs at ~1/C accuracy), so no drop
  check there. Without labels y, "accuracy" is measured against pseudo-labels: the argmax of
  `soft_targets` (e.g. the fused teacher on a held-out proxy slice) when given;
- "disagreement": no labels and no soft targets: fraction of the slice where the new model's
  argmax equals the previous model's falls below `min_agreement`, once the previous model is
  "established" (mean max-probability >= 1/C + confidence_margin: a random init is ~1/C);
- "kd_increase" (only if `max_kd_increase` is set and soft targets are given): the KD loss on the
  slice rose by more than that many nats.
Metrics (always filled): acc_before/acc_after (labels or pseudo-labels), agreement, top_share_*,
confidence_before, kd_before/kd_after (soft targets), param_change (relative L2, `before` a model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from server_app.models.large import predict_logits


@dataclass
class GateDecision:
    ok: bool
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (state_dict), on the model's own device."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Put a `snapshot` back in place (copies into the existing tensors: the model stays on its device)."""
    model.load_state_dict(copy.copy(snap))


def _softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = np.asarray(z, np.float64) / T
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return p


def _kd(logits: np.ndarray, q: np.ndarray, T: float) -> float:
    """T^2 * KL(q || softmax(logits/T)), mean over samples (as distill.kd_loss)."""
    logp = np.log(np.clip(_softmax(logits, T), 1e-12, None))
    qq = np.asarray(q, np.float64)
    return float(np.mean(np.sum(qq * (np.log(np.clip(qq, 1e-12, None)) - logp), axis=1)) * T * T)


def _top_share(pred: np.ndarray, num_classes: int) -> tuple[int, float]:
    counts = np.bincount(pred, minlength=num_classes)
    return int(counts.argmax()), float(counts.max() / max(1, len(pred)))


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


@torch.no_grad()
def _param_change(before: nn.Module, after: nn.Module) -> float:
    num, den = 0.0, 0.0
    for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True):
        if a.is_floating_point():
            num += float(torch.sum((b.double() - a.double().to(b.device)) ** 2))
            den += float(torch.sum(a.double() ** 2))
    return float(np.sqrt(num / den)) if den > 0 else float("inf") if num > 0 else 0.0


@dataclass
class ModelGate:
    """Accept/reject a new large-model version on a held-out slice (see module doc for the rules)."""

    tolerance: float = 0.10  # max absolute accuracy drop once past chance
    chance_margin: float = 0.10  # "past chance": acc_before >= 1/C + chance_margin
    collapse_frac: float = 0.90  # one class for more than this share of the slice = collapse
    min_agreement: float = 0.50  # label-free: min argmax agreement with the previous model
    confidence_margin: float = 0.20  # label-free "established": mean max-prob >= 1/C + this
    max_kd_increase: float | None = None  # nats; None: KD loss is reported, not gated
    temperature: float = 1.0  # of the KD loss

    def evaluate(
        self,
        before: nn.Module | np.ndarray,
        after: nn.Module,
        x: np.ndarray,
        y: np.ndarray | None = None,
        soft_targets: np.ndarray | None = None,
    ) -> GateDecision:
        """Decide on `after` (the model after this round) vs `before` (the previous model, or its
        logits on `x` computed before the round — the usual in-place case). y: int labels of x;
        soft_targets: [N, C] probabilities on x (pseudo-labels and KD loss when y is None)."""
        m: dict[str, Any] = {"n": int(len(x))}
        if isinstance(before, nn.Module):
            lb = predict_logits(before, x).astype(np.float64)
            m["param_change"] = _param_change(before, after)
        else:
            lb = np.asarray(before, np.float64)
        if lb.shape[0] != len(x):
            raise ValueError(f"{lb.shape[0]} previous outputs for {len(x)} inputs")
        if not _all_finite(after):
            return GateDecision(False, "non_finite_params", m)
        la = predict_logits(after, x).astype(np.float64)
        if not np.all(np.isfinite(la)):
            return GateDecision(False, "non_finite_outputs", m)
        C = la.shape[1]
        chance = 1.0 / C
        pb, pa = lb.argmax(1), la.argmax(1)
        cls_b, share_b = _top_share(pb, C)
        cls_a, share_a = _top_share(pa, C)
        conf_b = float(np.mean(_softmax(lb).max(1))) if np.all(np.isfinite(lb)) else 0.0
        m.update(agreement=float(np.mean(pa == pb)), top_share_before=share_b, top_share_after=share_a,
                 top_class_after=cls_a, confidence_before=conf_b)  # fmt: skip
        labels = None
        if y is not None:
            labels = np.asarray(y).astype(np.int64)
            m["label_source"] = "labels"
        elif soft_targets is not None:
            labels = np.asarray(soft_targets).argmax(1)
            m["label_source"] = "soft_targets"
        if soft_targets is not None:
            m["kd_before"] = (
                _kd(lb, soft_targets, self.temperature) if np.all(np.isfinite(lb)) else float("inf")
            )
            m["kd_after"] = _kd(la, soft_targets, self.temperature)
        if labels is not None:
            acc_b, acc_a = float(np.mean(pb == labels)), float(np.mean(pa == labels))
            m.update(acc_before=acc_b, acc_after=acc_a, established=acc_b >= chance + self.chance_margin)
        else:
            m["established"] = conf_b >= chance + self.confidence_margin
        # collapse: one class dominates now, did not before, and the labels do not explain it
        label_share = float(np.mean(labels == cls_a)) if labels is not None else 0.0
        if (
            share_a > self.collapse_frac
            and share_b <= self.collapse_frac
            and share_a > label_share + self.chance_margin
        ):
            return GateDecision(False, "collapse", m)
        if labels is not None:
            if m["established"] and m["acc_after"] < m["acc_before"] - self.tolerance:
                return GateDecision(False, "accuracy_drop", m)
        elif m["established"] and m["agreement"] < self.min_agreement:
            return GateDecision(False, "disagreement", m)
        if (
            self.max_kd_increase is not None
            and "kd_after" in m
            and m["kd_after"] > m["kd_before"] + self.max_kd_increase
        ):
            return GateDecision(False, "kd_increase", m)
        return GateDecision(True, None, m)
