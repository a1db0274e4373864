"""Local-only training: each device trains its small model on its own data and shares nothing."""

from __future__ import annotations

from typing import Any

from server_app.engine.strategies.common import device_seed
from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, DeviceResult, RoundReport


class LocalOnly(Strategy):
    name = "local_only"
    mode = "baseline"

    def __init__(self, local_epochs: int = 1, lr: float = 1e-3, seed: int = 0, **_: Any):
        self.local_epochs, self.lr, self.seed = local_epochs, lr, seed

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        return [
            Assignment(round_id, d.device_id, d.arch, 0, "local_only",
                       {"local_epochs": self.local_epochs, "lr": self.lr, "upload": [],
                        "seed": device_seed(self.seed, round_id, i)})  # fmt: skip
            for i, d in enumerate(devices)
        ]

    def aggregate(self, round_id: int, results: list[DeviceResult]) -> RoundReport:
        return RoundReport(round_id, {}, len(results), {r.device_id: dict(r.metrics) for r in results})
