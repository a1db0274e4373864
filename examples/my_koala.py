"""An example of extending KOALA Edge without touching its code (docs/extending.md).

Three plug-ins, each named in the policy as `module:attr` (the module must be importable, e.g. on
PYTHONPATH or installed):

    [policy]
    strategy = "examples.my_koala:ConfidentKoala"     # a Strategy subclass
    fusion = "examples.my_koala:top2_fusion"          # a fusion rule
    [policy.large]
    factory = "examples.my_koala:tiny_mlp"            # the server's large model

`tests/server_app/test_extending.py` runs exactly this file in `koala sim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from server_app.engine.strategies.koala import KoalaStrategy
from server_app.engine.types import Result, RoundReport
from server_app.policy import KoalaPolicy


class ConfidentKoala(KoalaStrategy):
    """KOALA that drops, each round, the devices whose logits are least confident (a user's idea of
    a filter), then aggregates as usual. Reads `plugin_options.keep_fraction` (default 0.75)."""

    name = "confident_koala"
    mode = "homo"

    @classmethod
    def policy_fields(cls, policy: KoalaPolicy) -> frozenset[str]:
        return super().policy_fields(policy) | {"fusion"}

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        keep = float(self.policy.plugin_options.get("keep_fraction", 0.75))
        scored = [r for r in results if r.proxy_logits is not None]
        if scored:
            conf = [float(np.mean(np.max(_softmax(r.proxy_logits), axis=1))) for r in scored]
            k = max(1, int(round(keep * len(scored))))
            best = set(np.argsort(conf)[::-1][:k].tolist())
            results = [r for i, r in enumerate(scored) if i in best]
        report = super().aggregate(round_id, results)
        report.metrics["kept_devices"] = len(results)
        return report


def top2_fusion(logits: Sequence[np.ndarray], *, temperature: float = 1.0, **_: Any) -> np.ndarray:
    """Consensus probabilities [P, C]: the mean of each teacher's probabilities restricted to its
    top-2 classes (renormalised). Same keyword arguments as server_app.engine.fusion.fuse_logits."""
    out = []
    for z in logits:
        p = _softmax(np.asarray(z, np.float64) / temperature)
        cut = np.sort(p, axis=1)[:, -2:-1]
        p = np.where(p >= cut, p, 0.0)
        out.append(p / p.sum(axis=1, keepdims=True))
    return np.mean(out, axis=0)


def tiny_mlp(input_shape: tuple[int, ...], num_classes: int, seed: int = 0, hidden: int = 64) -> nn.Module:
    """A large-model factory: (input_shape, num_classes, seed, **options) -> torch module taking
    NHWC float32 batches (what the server feeds the built-in LargeCNN)."""
    h, w, c = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(h * w * c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
