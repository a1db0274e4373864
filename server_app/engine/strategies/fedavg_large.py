"""FedAvg of the large model: the paper's "conventional approach" baseline.

Real devices cannot run torch, so the device step is simulated in-process (`device_simulators`
gives the fleet a `fedavg_large` task). Kept honest: same partitions, same local epochs, lr and
batch as the small models' on-device training (Adam, batch 32, fresh optimizer per round like
the LiteRT `set_weights` reset)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from server_app.engine.strategies.common import fedavg, weights_of
from server_app.engine.strategy import DeviceSimulator, Strategy
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport
from server_app.models.large import get_weights, model_device, set_weights
from server_app.policy import KoalaPolicy


def train_large_locally(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int, seed: int
) -> float:
    dev = model_device(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev)
    yt = torch.from_numpy(np.asarray(y, np.int64)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen).to(dev)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    model.eval()
    values = [float(v) for v in losses]  # one device sync at the end, not one per batch
    return float(np.mean(values)) if values else float("nan")


class FedAvgLarge(Strategy):
    name = "fedavg_large"
    mode = "baseline"

    USES = frozenset({"local_epochs", "lr"})

    def __init__(self, large: nn.Module, policy: KoalaPolicy | None = None):
        super().__init__(policy)
        self.large_model = large
        self._worker = copy.deepcopy(large)

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        w = get_weights(self.large_model)
        return [
            Assignment(round_id=round_id, device_id=d.device_id, arch="large", model_version=self.version,
                       plan=self.plan("fedavg_large", round_id, i, ("weights",)), weights=w)
            for i, d in enumerate(devices)
        ]

    def _simulate(self, a: Assignment, x: np.ndarray, y: np.ndarray) -> Result:
        if a.weights is None:  # configure_round always sends the large model's weights
            raise ValueError(f"fedavg_large assignment for {a.device_id} carries no weights")
        set_weights(self._worker, a.weights)
        p = a.plan
        loss = train_large_locally(self._worker, x, y, p.local_epochs, p.lr, p.batch, p.seed)
        return Result(round_id=a.round_id, device_id=a.device_id, arch=a.arch, num_samples=int(len(y)),
                      model_version=a.model_version, label_histogram=np.bincount(y, minlength=10).tolist(),
                      metrics={"train_loss": loss if np.isfinite(loss) else None}, weights=get_weights(self._worker))

    def device_simulators(self) -> dict[str, DeviceSimulator]:
        return {"fedavg_large": self._simulate}

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        set_weights(self.large_model, fedavg([weights_of(r) for r in results], [r.num_samples for r in results]))
        self.version += 1
        return RoundReport(round_id, {}, len(results), {r.device_id: dict(r.metrics) for r in results})
