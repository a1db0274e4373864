"""FedAvg of the small model: the federated baseline that fits on the devices (no large model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from server_app.engine.strategies.common import average_weights, weights_of, without_update_outliers
from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport
from server_app.policy import KoalaPolicy

if TYPE_CHECKING:  # LiteRT loads only when a small model is built
    from device_firmware_py.runtime.small_model import SmallModel


class FedAvgSmall(Strategy):
    name = "fedavg_small"
    mode = "baseline"

    USES = frozenset({"local_epochs", "lr", "weight_rule", "clip_factor", "count_cap", "outlier_factor"})

    def __init__(self, small_factory: Callable[[str], SmallModel], policy: KoalaPolicy | None = None):
        super().__init__(policy)
        self.small_factory = small_factory
        self._global: dict[str, list[np.ndarray]] = {}

    def global_small_weights(self) -> dict[str, list[np.ndarray]]:
        return dict(self._global)

    def set_global_small_weights(self, small: dict[str, list[np.ndarray]]) -> None:
        self._global = {a: list(ws) for a, ws in small.items()}

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        out = []
        for i, d in enumerate(devices):
            if d.arch not in self._global:
                self._global[d.arch] = self.small_factory(d.arch).get_weights()
            out.append(Assignment(round_id=round_id, device_id=d.device_id, arch=d.arch, model_version=self.version,
                                  plan=self.plan("fedavg_small", round_id, i, ("weights",)), weights=self._global[d.arch]))
        return out

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        for arch in {r.arch for r in results}:
            rs = [r for r in results if r.arch == arch and r.weights is not None]
            rs, _dropped = without_update_outliers(self.policy, rs, self._global.get(arch))
            if rs:
                self._global[arch] = average_weights(self.policy, [weights_of(r) for r in rs], [r.num_samples for r in rs],
                                                     reference=self._global.get(arch))  # fmt: skip
        self.version += 1
        return RoundReport(round_id, {}, len(results), {r.device_id: dict(r.metrics) for r in results})
