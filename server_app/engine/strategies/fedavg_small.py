"""FedAvg of the small model: the federated baseline that fits on the devices (no large model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server_app.engine.strategies.common import device_seed, fedavg
from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, DeviceResult, RoundReport


class FedAvgSmall(Strategy):
    name = "fedavg_small"
    mode = "baseline"

    def __init__(self, small_factory: Callable[[str], Any], local_epochs: int = 1, lr: float = 1e-3, seed: int = 0, **_: Any):
        self.small_factory = small_factory
        self.local_epochs, self.lr, self.seed = local_epochs, lr, seed
        self._global: dict[str, list] = {}

    def global_small_weights(self) -> dict[str, list]:
        return dict(self._global)

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        out = []
        for i, d in enumerate(devices):
            if d.arch not in self._global:
                self._global[d.arch] = self.small_factory(d.arch).get_weights()
            hyper = {"local_epochs": self.local_epochs, "lr": self.lr, "upload": ["weights"],
                     "seed": device_seed(self.seed, round_id, i)}  # fmt: skip
            out.append(Assignment(round_id, d.device_id, d.arch, round_id, "fedavg_small", hyper, None, self._global[d.arch]))
        return out

    def aggregate(self, round_id: int, results: list[DeviceResult]) -> RoundReport:
        for arch in {r.arch for r in results}:
            rs = [r for r in results if r.arch == arch and r.weights is not None]
            if rs:
                self._global[arch] = fedavg([r.weights for r in rs], [r.num_samples for r in rs])
        return RoundReport(round_id, {}, len(results), {r.device_id: dict(r.metrics) for r in results})
