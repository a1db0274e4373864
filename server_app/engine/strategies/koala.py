"""KOALA (arXiv 2407.05268), shared by the homogeneous and heterogeneous strategies.

Per round: [forward KD on device from the large model's proxy logits] -> local training on
device -> upload small weights (paper) or proxy logits -> build teachers -> fuse -> reverse KD
into the large model on the unlabeled proxy set.

Teachers ("teacher" option):
- "avg_model": FedAvg the uploaded weights per architecture (sample-weighted; the paper's homo
  path, and per-arch "intra-group aggregation" in hetero); each averaged model's proxy logits,
  computed on the server with the same LiteRT runtime, is one teacher; averaged weights go back
  to the devices next round.
- "device_logits": every device's uploaded proxy logits is a teacher (ensemble distillation);
  devices keep their own models.
Reverse KD ("rkd" option): "fused" = one consensus soft label (fusion rule) -> the large model;
"per_group" = the related code's variant: distil each architecture group's consensus into its
own copy of the large model, then average those large models weighted by group sample counts.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from server_app.engine.distill import reverse_distill
from server_app.engine.fusion import fuse_logits
from server_app.engine.pages import release_pages
from server_app.engine.robust import AGREEMENT_MIN_DEVICES, agreement_filter, canary_filter
from server_app.engine.strategies.common import (
    average_weights,
    capped_counts,
    capped_histograms,
    fedavg,
    histogram_of,
    logits_of,
    weights_of,
    without_update_outliers,
)
from server_app.engine.strategy import RoundRejected, Strategy
from server_app.engine.tensor_file import spilled
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport
from server_app.models.large import get_weights, predict_logits, set_weights
from server_app.policy import KoalaPolicy

if TYPE_CHECKING:  # LiteRT loads only when a small model is built
    from device_firmware_py.runtime.small_model import SmallModel

_KOALA_FIELDS = frozenset({
    "local_epochs", "lr", "fkd_epochs", "fkd_lr", "post_fkd_epochs", "fkd_from_round", "temperature",
    "proxy_per_round", "rkd_epochs", "rkd_lr", "rkd_batch", "teacher", "rkd", "anchor_lambda", "gate_collapse_frac",
    "count_cap", "agreement_filter", "canary_filter", "logits_dtype",
})  # fmt: skip


class KoalaStrategy(Strategy):
    name = "koala"

    def __init__(self, large: nn.Module, proxy_x: np.ndarray, small_factory: Callable[[str], SmallModel],
                 policy: KoalaPolicy | None = None, proxy_labels: np.ndarray | None = None):  # fmt: skip
        super().__init__(policy)
        self.large_model = large
        self.proxy_x = np.ascontiguousarray(proxy_x, np.float32)
        # labels of the proxy rows the server knows (-1: unknown); devices never see them
        self.proxy_labels = None if proxy_labels is None else np.asarray(proxy_labels, np.int64)
        if self.proxy_labels is not None and len(self.proxy_labels) != len(self.proxy_x):
            raise ValueError(f"proxy_labels has {len(self.proxy_labels)} rows, the proxy set {len(self.proxy_x)}")
        self.small_factory = small_factory  # arch -> SmallModel (server-side LiteRT, for avg_model teachers)
        self.teacher = self.policy.resolved_teacher()
        self._global: dict[str, list[np.ndarray]] = {}
        self._server_small: dict[str, SmallModel] = {}
        self._idx: np.ndarray | None = None  # this round's proxy subset
        self._dropped: list[str] = []  # devices the agreement filter left out this round
        # where per-device arrays of a round's aggregation go (the deployed server: its data dir);
        # None keeps them in memory (the simulation)
        self.spill_dir: str | Path | None = None

    @classmethod
    def policy_fields(cls, policy: KoalaPolicy) -> frozenset[str]:
        fused_many = policy.resolved_teacher() == "device_logits" or len(set(policy.archs)) > 1
        averages = policy.resolved_teacher() == "avg_model"
        return (_KOALA_FIELDS | ({"fusion"} if fused_many else set())
                | ({"weight_rule", "clip_factor", "outlier_factor"} if averages else set()))  # fmt: skip

    def _px(self) -> np.ndarray:
        return self.proxy_x if self._idx is None else self.proxy_x[self._idx]

    def _round_labels(self) -> np.ndarray | None:
        """Known labels of this round's proxy rows (-1 where unknown), or None without any."""
        if self.proxy_labels is None or self.policy.canary_filter is None:
            return None
        return self.proxy_labels if self._idx is None else self.proxy_labels[self._idx]

    # ---------------------------------------------------------------- helpers
    def _small(self, arch: str) -> SmallModel:
        if arch not in self._server_small:
            self._server_small[arch] = self.small_factory(arch)
        return self._server_small[arch]

    def global_small_weights(self) -> dict[str, list[np.ndarray]]:
        return dict(self._global)

    def set_global_small_weights(self, small: dict[str, list[np.ndarray]]) -> None:
        self._global = {a: list(ws) for a, ws in small.items()}

    def teacher_logits(self) -> np.ndarray:
        """The large model's logits on this round's proxy inputs (forward-KD teacher)."""
        return predict_logits(self.large_model, self._px())

    def proxy_subset(self, round_id: int) -> np.ndarray | None:
        """This round's sorted proxy rows (None: all), a pure function of (seed, round)."""
        p = self.policy
        if p.proxy_per_round and p.proxy_per_round < len(self.proxy_x):
            rng = np.random.default_rng([p.seed, round_id, 17])
            return np.sort(rng.choice(len(self.proxy_x), p.proxy_per_round, replace=False))
        return None

    # ------------------------------------------------------------ the round
    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        p = self.policy
        self._idx = self.proxy_subset(round_id)
        forward = p.fkd_epochs + p.post_fkd_epochs > 0 and round_id >= p.fkd_from_round
        teacher = self.teacher_logits() if forward else None
        upload = ("weights",) if self.teacher == "avg_model" else ("logits",)
        out = []
        for i, d in enumerate(devices):
            if self.teacher == "avg_model" and d.arch not in self._global:
                self._global[d.arch] = self._small(d.arch).get_weights()  # same init for every device
            out.append(Assignment(
                round_id=round_id, device_id=d.device_id, arch=d.arch, model_version=self.version,
                plan=self.plan("koala", round_id, i, upload), teacher_logits=teacher,
                proxy_indices=self._idx if teacher is not None or "logits" in upload else None,
                weights=self._global.get(d.arch) if self.teacher == "avg_model" else None,
            ))  # fmt: skip
        return out

    def _teachers(self, results: list[Result]) -> tuple[list[np.ndarray], list[int], list[list[int] | None], list[str]]:
        """(logits, sample counts, label histograms, group) per teacher."""
        if self.teacher == "device_logits":
            with_logits = [r for r in results if r.proxy_logits is not None]
            ok = self._agreeing(with_logits, [logits_of(r) for r in with_logits])
            return ([logits_of(r) for r in ok], [r.num_samples for r in ok],
                    [r.label_histogram for r in ok], [r.arch for r in ok])  # fmt: skip
        logits: list[np.ndarray] = []
        ns: list[int] = []
        hists: list[list[int] | None] = []
        groups: list[str] = []
        for arch in sorted({r.arch for r in results}):
            rs = [r for r in results if r.arch == arch and r.weights is not None]
            if not rs:
                continue
            rs, dropped = without_update_outliers(self.policy, rs, self._global.get(arch))  # rescaled / sign-flipped
            self._dropped += dropped
            judge = self.policy.agreement_filter is not None or self._round_labels() is not None
            if judge and len(rs) >= AGREEMENT_MIN_DEVICES:  # else nothing to judge
                m = self._small(arch)
                # each device's model on this round's proxy rows (server-side LiteRT); on disk when
                # the deployment gave a spill dir (200 kB per device at 5,000 x 10: 2 GB at 10,000)
                own = spilled((self._device_model_logits(m, r) for r in rs), self._spill_path(f"own-{arch}"))
                rs = self._agreeing(rs, own)
            self._global[arch] = average_weights(self.policy, [weights_of(r) for r in rs], [r.num_samples for r in rs],
                                                 reference=self._global.get(arch))  # fmt: skip
            m = self._small(arch)
            m.set_weights(self._global[arch])
            logits.append(m.logits(self._px()))
            ns.append(sum(r.num_samples for r in rs))
            hists.append(np.sum([histogram_of(r) for r in rs], axis=0).tolist())
            groups.append(arch)
        return logits, ns, hists, groups

    def _device_model_logits(self, m: SmallModel, r: Result) -> np.ndarray:
        m.set_weights(weights_of(r))
        for w in r.weights or []:
            release_pages(w)
        return m.logits(self._px())

    def _spill_path(self, name: str) -> Path | None:
        """A fresh file for a round's per-device working arrays, or None (keep them in memory)."""
        if self.spill_dir is None:
            return None
        return Path(self.spill_dir) / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tensors"

    def _agreeing(self, results: list[Result], logits: list[np.ndarray]) -> list[Result]:
        """The results whose models beat chance on the known proxy labels (policy `canary_filter`)
        and then agree with the ensemble (policy `agreement_filter`)."""
        labels, factor = self._round_labels(), self.policy.canary_filter
        if labels is not None and factor is not None:  # labels are None without a canary_filter
            keep, _acc = canary_filter(logits, labels, factor,
                                       histograms=[r.label_histogram for r in results])
            self._dropped += [r.device_id for r, k in zip(results, keep, strict=True) if not k]
            results = [r for r, k in zip(results, keep, strict=True) if k]
            logits = [z for z, k in zip(logits, keep, strict=True) if k]
        if self.policy.agreement_filter is None:
            return results
        keep, agree = agreement_filter(logits, self.policy.agreement_filter)
        self._dropped += [r.device_id for r, k in zip(results, keep, strict=True) if not k]
        return [r for r, k in zip(results, keep, strict=True) if k]

    def _fuse(self, logits: list[np.ndarray], ns: list[int], hists: list[list[int] | None],
              groups: list[str]) -> np.ndarray:  # fmt: skip
        rule = self.policy.fusion
        if ":" in rule:  # a user's rule: same signature as fuse_logits minus `rule`
            from server_app.engine.strategies import load_ref

            return np.asarray(load_ref(rule, "fusion")(logits, temperature=self.policy.temperature, num_samples=ns,
                                                       label_histograms=hists, groups=groups), np.float64)  # fmt: skip
        caps = capped_counts(self.policy, ns)
        return fuse_logits(logits, rule, self.policy.temperature, num_samples=caps,
                           label_histograms=capped_histograms(hists, ns, caps), groups=groups)  # fmt: skip

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        """Teachers -> fusion -> reverse KD, then the model gate: a round whose new large model
        fails it (non-finite, collapsed) is rolled back whole and raises RoundRejected, so one
        round's bad data never becomes the published model."""
        from server_app.engine.gate import ModelGate, restore, snapshot

        snap, small_before = snapshot(self.large_model), dict(self._global)
        x_eval = self._gate_slice()
        before = predict_logits(self.large_model, x_eval)
        report = self._aggregate(round_id, results)
        # label-free and lenient on purpose: honest early rounds of a non-IID fleet may change the
        # model a lot or favour one class (a collapse check rejected honest rounds of small test
        # fleets), so by default only a non-finite model is refused; `gate_collapse_frac` adds the
        # collapse check, judged only once a round has been accepted (a random init is no reference)
        frac = self.policy.gate_collapse_frac if self.version > 0 and self.policy.gate_collapse_frac else 1.01
        gate = ModelGate(min_agreement=0.0, collapse_frac=frac, temperature=self.policy.temperature)
        decision = gate.evaluate(before, self.large_model, x_eval)
        report.metrics.update({f"gate_{k}": v for k, v in decision.metrics.items() if isinstance(v, (int, float))})
        if not decision.ok:
            restore(self.large_model, snap)
            self._global = small_before
            raise RoundRejected(f"model gate: {decision.reason} (large model rolled back to version {self.version})")
        if report.metrics.get("teachers"):
            self.version += 1  # a new large-model version exists
        return report

    def _gate_slice(self, n: int = 256) -> np.ndarray:
        """A fixed slice of the proxy set the gate scores every round's new model on."""
        idx = np.random.default_rng([self.policy.seed, 99]).permutation(len(self.proxy_x))[:n]
        return self.proxy_x[np.sort(idx)]

    def _aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        p = self.policy
        self._dropped = []
        logits, ns, hists, groups = self._teachers(results)
        metrics: dict[str, Any] = {"teachers": len(logits), "dropped_disagreeing": len(self._dropped)}
        if not logits:
            return RoundReport(round_id, metrics)
        anchor = [q.detach().clone() for q in self.large_model.parameters()] if p.anchor_lambda > 0 else None

        def distill(student: nn.Module, q: np.ndarray) -> float:
            return reverse_distill(student, self._px(), q, T=p.temperature, epochs=p.rkd_epochs, lr=p.rkd_lr,
                                   batch=p.rkd_batch, anchor=anchor, anchor_lambda=p.anchor_lambda,
                                   seed=p.seed * 7919 + round_id)  # fmt: skip

        if p.rkd == "per_group":
            base = copy.deepcopy(self.large_model)
            states, gn, losses = [], [], []
            for g in sorted(set(groups)):
                idx = [i for i, x in enumerate(groups) if x == g]
                q = self._fuse([logits[i] for i in idx], [ns[i] for i in idx], [hists[i] for i in idx], [g] * len(idx))
                student = copy.deepcopy(base)
                losses.append(distill(student, q))
                states.append(get_weights(student))
                gn.append(sum(ns[i] for i in idx))
            set_weights(self.large_model, fedavg(states, gn))
            metrics["rkd_loss"] = float(np.mean(losses))
        else:
            q = self._fuse(logits, ns, hists, groups)
            metrics["rkd_loss"] = distill(self.large_model, q)
            metrics["teacher_agreement"] = float(np.mean(q.argmax(1) == self.teacher_logits().argmax(1)))
        dm = {r.device_id: dict(r.metrics) for r in results}
        return RoundReport(round_id, metrics, len(results), dm)
