"""Gap-closing candidates for issue 15, as a `module:attr` strategy plugin (docs/extending.md), so
they can be measured without touching the engine or the policy: policy
`strategy = "research.koala_candidates:KoalaHomoPlus"`, `teacher = "avg_model"`, and
`plugin_options`:

- `device_ensemble` (float w >= 0, default 0 = off): FedDF-style ensemble teacher (Lin et al.
  2020) on top of the paper's averaged-model teacher. The server already holds every device's
  uploaded small weights, so it scores each device model on the proxy rows (server-side LiteRT,
  as the agreement filter does) and the soft label becomes
  q = (p_avg + w * sum_d n_d p_d / sum_d n_d) / (1 + w), p = softmax(logits / T), n = capped
  sample counts. Devices still upload weights only (uplink unchanged) and still start each round
  from the FedAvg of the small weights.
- `ensemble_fusion` (str, default "weighted"): how the device models' soft labels above are fused
  (`server_app.engine.fusion` rules). "class_aware" weighs device d on class c by its share of the
  class-c training data (its label histogram, capped like its count): at label skew a device
  model is an expert on the classes it holds, and the plain sample-weighted mean lets the
  others outvote it there (the hetero default since 2026-12-04 for the same reason).
- `teacher_ema` (float beta in [0, 1), default 0 = off): a temporal ensemble of the teachers over
  rounds: per proxy row, q_r = beta * q_{r-1} + (1 - beta) * q_new (rows seen for the first
  time take q_new). The large model then learns the consensus of several rounds' teachers.

- `rkd_augment` (int s >= 0, default 0 = off): consistent-view reverse KD ("a good teacher is
  patient and consistent", Beyer et al. 2022): every reverse-KD epoch the server draws a fresh
  random view of each proxy image (shift by up to s pixels, edge-padded, and a horizontal flip
  with probability 1/2), scores the averaged small model on that same view (server-side LiteRT,
  about a second per epoch for 5,000 images) and the large model learns those soft labels. The
  large model thus sees rkd_epochs x P distinct inputs instead of P; devices and uplink are
  unchanged. Not combined with the other two options.

With all options at 0 the strategy is exactly `koala_homo` (avg_model teacher).

`KoalaHeteroPlus` (`strategy = "research.koala_candidates:KoalaHeteroPlus"`) is `koala_hetero` with
`teacher_ema` only: at strong label skew the fused device logits change a lot from round to round
and the large model, refit to each round's consensus, swings with them (full scale, alpha 0.1,
seed 1: 0.734 -> 0.632 -> 0.734 -> 0.787 over rounds 2-5); the temporal ensemble smooths the
target (measured: the dip gone, the final round not higher; README Results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from server_app.engine.fusion import fuse_logits, softmax
from server_app.engine.strategies.common import capped_counts, capped_histograms
from server_app.engine.strategies.koala_hetero import KoalaHetero
from server_app.engine.strategies.koala_homo import KoalaHomo
from server_app.engine.types import Result, RoundReport
from server_app.policy import KoalaPolicy


def _options(policy: KoalaPolicy, known: set[str], who: str) -> dict[str, Any]:
    opts = dict(policy.plugin_options)
    if set(opts) - known:
        raise ValueError(f"{who}: unknown plugin_options {sorted(set(opts) - known)}")
    return opts


class TeacherEma:
    """`teacher_ema`: per proxy row, q_r = beta * q_{r-1} + (1 - beta) * q_new; a row seen for the
    first time takes q_new. beta = 0 returns q unchanged."""

    def __init__(self, proxy_rows: int, beta: float):
        self.beta, self.rows = beta, proxy_rows
        self._store: np.ndarray | None = None  # [P_total, C]
        self._seen = np.zeros(proxy_rows, bool)

    def apply(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.beta <= 0:
            return q
        if self._store is None:
            self._store = np.zeros((self.rows, q.shape[1]))
        seen = self._seen[rows]
        q[seen] = self.beta * self._store[rows[seen]] + (1 - self.beta) * q[seen]
        self._store[rows] = q
        self._seen[rows] = True
        return q


class KoalaHomoPlus(KoalaHomo):
    name = "koala_homo_plus"
    mode = "homo"

    def __init__(self, large: nn.Module, proxy_x: np.ndarray, small_factory: Callable[[str], Any],
                 policy: KoalaPolicy | None = None):  # fmt: skip
        super().__init__(large, proxy_x, small_factory, policy)
        opts = _options(self.policy, {"device_ensemble", "ensemble_fusion", "teacher_ema", "rkd_augment"},
                        "KoalaHomoPlus")
        if self.teacher != "avg_model":
            raise ValueError("KoalaHomoPlus needs teacher = 'avg_model' (it adds to the averaged-model teacher)")
        self.device_ensemble = float(opts.get("device_ensemble", 0.0))
        self.teacher_ema = float(opts.get("teacher_ema", 0.0))
        self.rkd_augment = int(opts.get("rkd_augment", 0))
        self.ensemble_fusion = str(opts.get("ensemble_fusion", "weighted"))
        if self.ensemble_fusion not in ("weighted", "class_aware"):
            raise ValueError("ensemble_fusion must be 'weighted' or 'class_aware'")
        if self.device_ensemble < 0 or not 0 <= self.teacher_ema < 1 or self.rkd_augment < 0:
            raise ValueError("device_ensemble must be >= 0, teacher_ema in [0, 1), rkd_augment >= 0")
        if self.rkd_augment and (self.device_ensemble or self.teacher_ema or self.policy.rkd != "fused"):
            raise ValueError("rkd_augment is not combined with device_ensemble, teacher_ema or rkd = per_group")
        self._dev: tuple[list[np.ndarray], list[int], list[list[int]]] = ([], [], [])
        self._ema = TeacherEma(len(self.proxy_x), self.teacher_ema)

    def _teachers(self, results: list[Result]):
        out = super()._teachers(results)
        self._dev = ([], [], [])
        if self.device_ensemble > 0:
            dropped = set(self._dropped)
            for arch in sorted({r.arch for r in results}):
                m = self._small(arch)
                for r in results:
                    if r.arch == arch and r.weights is not None and r.device_id not in dropped:
                        m.set_weights(r.weights)
                        self._dev[0].append(m.logits(self._px()))
                        self._dev[1].append(r.num_samples)
                        self._dev[2].append(r.label_histogram or [])
                if arch in self._global:
                    m.set_weights(self._global[arch])  # leave the server's small model as the base left it
        return out

    def _fuse(self, logits, ns, hists, groups) -> np.ndarray:
        q = np.asarray(super()._fuse(logits, ns, hists, groups), np.float64)
        T = self.policy.temperature
        if self.device_ensemble > 0 and self._dev[0]:
            caps = capped_counts(self.policy, self._dev[1])
            if self.ensemble_fusion == "class_aware":  # every accepted result carries its histogram (check_result)
                ens = np.asarray(fuse_logits(self._dev[0], "class_aware", T, num_samples=caps,
                                             label_histograms=capped_histograms(self._dev[2], self._dev[1], caps)),
                                 np.float64)  # fmt: skip
            else:
                n = np.asarray(caps, np.float64)
                ens = np.tensordot(n / n.sum(), softmax(np.stack(self._dev[0]), T), axes=1)
            q = (q + self.device_ensemble * ens) / (1.0 + self.device_ensemble)
        q = self._ema.apply(q, np.arange(len(self.proxy_x)) if self._idx is None else self._idx)
        q = q / q.sum(axis=1, keepdims=True)
        return q.astype(np.float32)

    # ------------------------------------------------ consistent-view reverse KD
    def _aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        if not self.rkd_augment:
            return super()._aggregate(round_id, results)
        import torch

        from server_app.engine.distill import kd_loss
        from server_app.models.large import model_device

        p = self.policy
        self._dropped = []
        logits, ns, hists, groups = self._teachers(results)
        metrics: dict[str, Any] = {"teachers": len(logits), "dropped_disagreeing": len(self._dropped)}
        if not logits:
            return RoundReport(round_id, metrics)
        q_plain = self._fuse(logits, ns, hists, groups)
        teachers = []  # (averaged model, its share of the samples) per architecture
        for arch, n in zip(groups, ns, strict=True):
            m = self.small_factory(arch)
            m.set_weights(self._global[arch])
            teachers.append((m, n))
        total = float(sum(n for _, n in teachers))
        x0 = self._px()
        rng = np.random.default_rng([p.seed, round_id, 29])
        dev = model_device(self.large_model)
        opt = torch.optim.Adam(self.large_model.parameters(), lr=p.rkd_lr)
        gen = torch.Generator().manual_seed(p.seed * 7919 + round_id)
        self.large_model.train()
        losses = []
        for _ in range(p.rkd_epochs):
            xa = augment(x0, self.rkd_augment, rng)
            q = sum((n / total) * softmax(m.logits(xa), p.temperature) for m, n in teachers)
            xt = torch.from_numpy(np.ascontiguousarray(xa, np.float32)).to(dev)
            qt = torch.from_numpy(np.ascontiguousarray(q, np.float32)).to(dev)
            perm = torch.randperm(len(xt), generator=gen).to(dev)
            for i in range(0, len(xt), p.rkd_batch):
                idx = perm[i : i + p.rkd_batch]
                loss = kd_loss(self.large_model(xt[idx]), qt[idx], p.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        self.large_model.eval()
        metrics["rkd_loss"] = float(np.mean([float(v) for v in losses])) if losses else float("nan")
        metrics["teacher_agreement"] = float(np.mean(q_plain.argmax(1) == self.teacher_logits().argmax(1)))
        return RoundReport(round_id, metrics, len(results), {r.device_id: dict(r.metrics) for r in results})


class KoalaHeteroPlus(KoalaHetero):
    name = "koala_hetero_plus"
    mode = "hetero"

    def __init__(self, large: nn.Module, proxy_x: np.ndarray, small_factory: Callable[[str], Any],
                 policy: KoalaPolicy | None = None):  # fmt: skip
        super().__init__(large, proxy_x, small_factory, policy)
        opts = _options(self.policy, {"teacher_ema"}, "KoalaHeteroPlus")
        self.teacher_ema = float(opts.get("teacher_ema", 0.0))
        if not 0 <= self.teacher_ema < 1:
            raise ValueError("teacher_ema must be in [0, 1)")
        self._ema = TeacherEma(len(self.proxy_x), self.teacher_ema)

    def _fuse(self, logits, ns, hists, groups) -> np.ndarray:
        q = np.asarray(super()._fuse(logits, ns, hists, groups), np.float64)
        q = self._ema.apply(q, np.arange(len(self.proxy_x)) if self._idx is None else self._idx)
        q = q / q.sum(axis=1, keepdims=True)
        return q.astype(np.float32)


def augment(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """A random view of each NHWC image: shifted by up to `shift` pixels each way (edge-padded)
    and flipped left-right with probability 1/2."""
    n, h, w, _ = x.shape
    pad = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dy = rng.integers(0, 2 * shift + 1, n)
    dx = rng.integers(0, 2 * shift + 1, n)
    out = np.empty_like(x)
    for oy in range(2 * shift + 1):
        for ox in range(2 * shift + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = pad[sel, oy : oy + h, ox : ox + w]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out
