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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from server_app.engine.distill import reverse_distill
from server_app.engine.fusion import fuse_logits
from server_app.engine.strategies.common import device_seed, fedavg
from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, DeviceResult, RoundReport
from server_app.models.large import get_weights, predict_logits, set_weights


@dataclass
class KoalaConfig:
    teacher: str = "avg_model"  # "avg_model" | "device_logits"
    fusion: str = "weighted"  # fuse_logits rule across teachers
    rkd: str = "fused"  # "fused" | "per_group"
    temperature: float = 1.0  # both KD directions
    rkd_epochs: int = 1
    rkd_lr: float = 1e-3
    rkd_batch: int = 256
    anchor_lambda: float = 0.0  # parameter anchor to the pre-round large model
    forward_kd: bool = True
    fkd_from_round: int = 1  # the untrained large model of round 0 is no teacher
    fkd_epochs: int = 1
    fkd_lr: float = 1e-3
    post_kd_epochs: int = 0
    proxy_per_round: int | None = None  # sample this many proxy inputs per round (None: all)
    local_epochs: int = 1
    lr: float = 1e-3
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class KoalaStrategy(Strategy):
    name = "koala"

    def __init__(
        self,
        large: nn.Module,
        proxy_x: np.ndarray,
        small_factory: Callable[[str], Any],
        config: KoalaConfig | None = None,
        **overrides: Any,
    ):
        self.large_model = large
        self.proxy_x = np.ascontiguousarray(proxy_x, np.float32)
        self.small_factory = small_factory  # arch -> SmallModel (server-side LiteRT, for avg_model teachers)
        cfg = config or KoalaConfig()
        self.cfg = KoalaConfig(**{**asdict(cfg), **overrides})
        self._global: dict[str, list[np.ndarray]] = {}
        self._server_small: dict[str, Any] = {}
        self.version = 0
        self._idx: np.ndarray | None = None  # this round's proxy subset

    def _px(self) -> np.ndarray:
        return self.proxy_x if self._idx is None else self.proxy_x[self._idx]

    # ---------------------------------------------------------------- helpers
    def _small(self, arch: str) -> Any:
        if arch not in self._server_small:
            self._server_small[arch] = self.small_factory(arch)
        return self._server_small[arch]

    def global_small_weights(self) -> dict[str, list[np.ndarray]]:
        return dict(self._global)

    def teacher_logits(self) -> np.ndarray:
        """The large model's logits on this round's proxy inputs (forward-KD teacher)."""
        return predict_logits(self.large_model, self._px())

    # ------------------------------------------------------------ the round
    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        c = self.cfg
        self._idx = None
        if c.proxy_per_round and c.proxy_per_round < len(self.proxy_x):
            rng = np.random.default_rng([c.seed, round_id, 17])
            self._idx = np.sort(rng.choice(len(self.proxy_x), c.proxy_per_round, replace=False))
        teacher = self.teacher_logits() if c.forward_kd and round_id >= c.fkd_from_round else None
        upload = ["weights"] if c.teacher == "avg_model" else ["logits"]
        out = []
        for i, d in enumerate(devices):
            if c.teacher == "avg_model" and d.arch not in self._global:
                self._global[d.arch] = self._small(d.arch).get_weights()  # same init for every device
            hyper = {
                "local_epochs": c.local_epochs, "lr": c.lr, "kd_epochs": c.fkd_epochs, "kd_lr": c.fkd_lr,
                "temperature": c.temperature, "upload": upload, "seed": device_seed(c.seed, round_id, i),
                "post_kd_epochs": c.post_kd_epochs,
                "proxy_indices": None if self._idx is None else self._idx.tolist(),
            }  # fmt: skip
            out.append(Assignment(
                round_id=round_id, device_id=d.device_id, arch=d.arch, model_version=self.version, task="koala",
                hyper=hyper, teacher_logits=teacher,
                weights=self._global.get(d.arch) if c.teacher == "avg_model" else None,
            ))  # fmt: skip
        return out

    def _teachers(self, results: list[DeviceResult]) -> tuple[list[np.ndarray], list[int], list[list[int]], list[str]]:
        """(logits, sample counts, label histograms, group) per teacher."""
        c = self.cfg
        if c.teacher == "device_logits":
            ok = [r for r in results if r.proxy_logits is not None]
            return ([r.proxy_logits for r in ok], [r.num_samples for r in ok],
                    [r.label_histogram for r in ok], [r.arch for r in ok])  # fmt: skip
        logits, ns, hists, groups = [], [], [], []
        for arch in sorted({r.arch for r in results}):
            rs = [r for r in results if r.arch == arch and r.weights is not None]
            if not rs:
                continue
            self._global[arch] = fedavg([r.weights for r in rs], [r.num_samples for r in rs])
            m = self._small(arch)
            m.set_weights(self._global[arch])
            logits.append(m.logits(self._px()))
            ns.append(sum(r.num_samples for r in rs))
            hists.append(np.sum([r.label_histogram for r in rs], axis=0).tolist())
            groups.append(arch)
        return logits, ns, hists, groups

    def _fuse(self, logits, ns, hists, groups) -> np.ndarray:
        return fuse_logits(logits, self.cfg.fusion, self.cfg.temperature, num_samples=ns,
                           label_histograms=hists, groups=groups)  # fmt: skip

    def aggregate(self, round_id: int, results: list[DeviceResult]) -> RoundReport:
        c = self.cfg
        logits, ns, hists, groups = self._teachers(results)
        metrics: dict[str, Any] = {"teachers": len(logits)}
        if not logits:
            return RoundReport(round_id, metrics)
        anchor = [p.detach().clone() for p in self.large_model.parameters()] if c.anchor_lambda > 0 else None
        kd = {"T": c.temperature, "epochs": c.rkd_epochs, "lr": c.rkd_lr, "batch": c.rkd_batch,
              "anchor": anchor, "anchor_lambda": c.anchor_lambda, "seed": c.seed * 7919 + round_id}  # fmt: skip
        if c.rkd == "per_group":
            base = copy.deepcopy(self.large_model)
            states, gn, losses = [], [], []
            for g in sorted(set(groups)):
                idx = [i for i, x in enumerate(groups) if x == g]
                q = self._fuse([logits[i] for i in idx], [ns[i] for i in idx], [hists[i] for i in idx], [g] * len(idx))
                student = copy.deepcopy(base)
                losses.append(reverse_distill(student, self._px(), q, **kd))
                states.append(get_weights(student))
                gn.append(sum(ns[i] for i in idx))
            set_weights(self.large_model, fedavg(states, gn))
            metrics["rkd_loss"] = float(np.mean(losses))
        else:
            q = self._fuse(logits, ns, hists, groups)
            metrics["rkd_loss"] = reverse_distill(self.large_model, self._px(), q, **kd)
            metrics["teacher_agreement"] = float(np.mean(q.argmax(1) == self.teacher_logits().argmax(1)))
        self.version += 1
        dm = {r.device_id: dict(r.metrics) for r in results}
        return RoundReport(round_id, metrics, len(results), dm)
