"""Strategy base (Flower-style): the algorithm decides what each device does and what to do with
what comes back; it never talks to a transport. The strategy owns the large model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from server_app.engine.types import Assignment, DeviceInfo, DeviceResult, RoundReport

# A device simulator runs an assignment whose work a real device cannot do (e.g. train the torch
# large model for the FedAvg-large baseline): (assignment, x_private, y_private) -> DeviceResult.
DeviceSimulator = Callable[[Assignment, np.ndarray, np.ndarray], DeviceResult]


class Strategy:
    """Base class. Subclasses implement `configure_round` and `aggregate`."""

    name: str = "strategy"
    mode: str = "baseline"  # "homo" | "hetero" | "baseline"
    large_model: Any = None  # torch.nn.Module or None

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        raise NotImplementedError

    def aggregate(self, round_id: int, results: list[DeviceResult]) -> RoundReport:
        raise NotImplementedError

    def global_small_weights(self) -> dict[str, list[np.ndarray]]:
        """arch -> current global small weights, where the strategy keeps one (FedAvg variants)."""
        return {}

    def device_simulators(self) -> dict[str, DeviceSimulator]:
        """task name -> in-process simulator, for tasks real devices cannot run."""
        return {}

    def quorum(self, devices: list[DeviceInfo]) -> int:
        """Results needed to close a round (all, by default)."""
        return len(devices)
