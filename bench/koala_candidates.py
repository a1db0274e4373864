"""Gap-closing candidates for issue 15, as a `module:attr` strategy plugin (docs/extending.md), so
they can be measured without touching the engine or the policy: policy
`strategy = "bench.koala_candidates:KoalaHomoPlus"`, `teacher = "avg_model"`, and
`plugin_options`:

- `device_ensemble` (float w >= 0, default 0 = off): FedDF-style ensemble teacher (Lin et al.
  2020) on top of the paper's averaged-model teacher. The server already holds every device's
  uploaded small weights, so it scores each device model on the proxy rows (server-side LiteRT,
  as the agreement filter does) and the soft label becomes
  q = (p_avg + w * sum_d n_d p_d / sum_d n_d) / (1 + w), p = softmax(logits / T), n = capped
  sample counts. Devices still upload weights only (uplink unchanged) and still start each round
  from the FedAvg of the small weights.
- `teacher_ema` (float beta in [0, 1), default 0 = off): a temporal ensemble of the teachers over
  rounds: per proxy row, q_r = beta * q_{r-1} + (1 - beta) * q_new (rows seen for the first
  time take q_new). The large model then learns the consensus of several rounds' teachers.

With both options at 0 the strategy is exactly `koala_homo` (avg_model teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from server_app.engine.fusion import softmax
from server_app.engine.strategies.common import capped_counts
from server_app.engine.strategies.koala_homo import KoalaHomo
from server_app.engine.types import Result
from server_app.policy import KoalaPolicy


class KoalaHomoPlus(KoalaHomo):
    name = "koala_homo_plus"
    mode = "homo"

    def __init__(self, large: nn.Module, proxy_x: np.ndarray, small_factory: Callable[[str], Any],
                 policy: KoalaPolicy | None = None):  # fmt: skip
        super().__init__(large, proxy_x, small_factory, policy)
        opts = dict(self.policy.plugin_options)
        unknown = set(opts) - {"device_ensemble", "teacher_ema"}
        if unknown:
            raise ValueError(f"KoalaHomoPlus: unknown plugin_options {sorted(unknown)}")
        if self.teacher != "avg_model":
            raise ValueError("KoalaHomoPlus needs teacher = 'avg_model' (it adds to the averaged-model teacher)")
        self.device_ensemble = float(opts.get("device_ensemble", 0.0))
        self.teacher_ema = float(opts.get("teacher_ema", 0.0))
        if self.device_ensemble < 0 or not 0 <= self.teacher_ema < 1:
            raise ValueError("device_ensemble must be >= 0 and teacher_ema in [0, 1)")
        self._dev: tuple[list[np.ndarray], list[int]] = ([], [])
        self._q_store: np.ndarray | None = None  # [P_total, C] EMA of the soft labels
        self._seen: np.ndarray | None = None

    def _teachers(self, results: list[Result]):
        out = super()._teachers(results)
        self._dev = ([], [])
        if self.device_ensemble > 0:
            dropped = set(self._dropped)
            for arch in sorted({r.arch for r in results}):
                m = self._small(arch)
                for r in results:
                    if r.arch == arch and r.weights is not None and r.device_id not in dropped:
                        m.set_weights(r.weights)
                        self._dev[0].append(m.logits(self._px()))
                        self._dev[1].append(r.num_samples)
                if arch in self._global:
                    m.set_weights(self._global[arch])  # leave the server's small model as the base left it
        return out

    def _fuse(self, logits, ns, hists, groups) -> np.ndarray:
        q = np.asarray(super()._fuse(logits, ns, hists, groups), np.float64)
        T = self.policy.temperature
        if self.device_ensemble > 0 and self._dev[0]:
            n = np.asarray(capped_counts(self.policy, self._dev[1]), np.float64)
            ens = np.tensordot(n / n.sum(), softmax(np.stack(self._dev[0]), T), axes=1)
            q = (q + self.device_ensemble * ens) / (1.0 + self.device_ensemble)
        if self.teacher_ema > 0:
            rows = np.arange(len(self.proxy_x)) if self._idx is None else self._idx
            if self._q_store is None:
                self._q_store = np.zeros((len(self.proxy_x), q.shape[1]))
                self._seen = np.zeros(len(self.proxy_x), bool)
            seen = self._seen[rows]
            q[seen] = self.teacher_ema * self._q_store[rows[seen]] + (1 - self.teacher_ema) * q[seen]
            self._q_store[rows] = q
            self._seen[rows] = True
        q = q / q.sum(axis=1, keepdims=True)
        return q.astype(np.float32)
