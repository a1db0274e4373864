"""Local-only training: each device trains its small model on its own data and shares nothing."""

from __future__ import annotations

from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport


class LocalOnly(Strategy):
    name = "local_only"
    mode = "baseline"

    USES = frozenset({"local_epochs", "lr"})

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        return [
            Assignment(round_id=round_id, device_id=d.device_id, arch=d.arch,
                       plan=self.plan("local_only", round_id, i, ()))
            for i, d in enumerate(devices)
        ]

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        return RoundReport(round_id, {}, len(results), {r.device_id: dict(r.metrics) for r in results})
