"""Fleet: where assignments go and results come from. `InMemoryFleet` simulates devices in this
process with the real LiteRT runtime; the MQTT fleet implements the same protocol over a broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from device_firmware_py.contract import codec
from device_firmware_py.task import execute_assignment, label_histogram
from server_app.engine.strategy import DeviceSimulator
from server_app.engine.types import Assignment, DeviceInfo, Result, hold_logits

if TYPE_CHECKING:  # LiteRT loads only when a simulated device trains
    from device_firmware_py.runtime.small_model import SmallModel


class Fleet(Protocol):
    def devices(self) -> list[DeviceInfo]: ...

    def run_round(
        self, assignments: list[Assignment], quorum: int, timeout_s: float | None
    ) -> list[Result]: ...


@dataclass
class SimDevice:
    """One simulated device: its private data and (lazily) its LiteRT small model."""

    device_id: str
    arch: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    model: SmallModel | None = None


class InMemoryFleet:
    """Devices as SmallModel instances in this process. Sequential: 2 cores, deterministic.

    `wire=True` (default) passes every assignment and result through the contract's codec, so a
    simulated device sees exactly the bytes a deployed one gets (float16 teacher logits, the int32
    proxy subset, the typed plan) and the strategy gets what a deployed server holds: the uploaded
    logits in the plan's wire dtype, decoded and held as float16 (`types.hold_logits`, as the
    deployed collection does; lossless for float16 uploads, a rounding of int8 ones).
    Simulation and deployment differ only in transport and timing.
    """

    def __init__(
        self,
        devices: list[SimDevice],
        proxy_x: np.ndarray | None,
        model_factory: Callable[[str, tuple[int, ...]], SmallModel] | None = None,
        simulators: dict[str, DeviceSimulator] | None = None,
        progress: Callable[[int], object] | None = None,
        wire: bool = True,
    ):
        self.wire = wire
        self._devices = {d.device_id: d for d in devices}
        self.proxy_x = proxy_x
        self.simulators = dict(simulators or {})
        self.progress = progress
        self._factory = model_factory or _litert_factory

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(d.device_id, d.arch, int(len(d.y)), label_histogram(d.y, d.num_classes))
            for d in self._devices.values()
        ]

    def model(self, device_id: str) -> SmallModel:
        d = self._devices[device_id]
        if d.model is None:
            d.model = self._factory(d.arch, tuple(d.x.shape[1:]))
        return d.model

    def run_round(
        self, assignments: list[Assignment], quorum: int | None = None, timeout_s: float | None = None
    ) -> list[Result]:
        out = []
        encoder = codec.FrameEncoder()  # the round's shared teacher body converted and hashed once, as MqttFleet does
        for a in assignments:
            d = self._devices[a.device_id]
            if a.task in self.simulators:
                out.append(self.simulators[a.task](a, d.x, d.y))
            else:
                if self.wire:
                    a = codec.decode_frame(encoder.encode(a), Assignment)
                r = execute_assignment(self.model(a.device_id), d.x, d.y, self.proxy_x, a)
                if self.wire:
                    r = hold_logits(codec.decode_frame(codec.encode_frame(r, logits_dtype=a.plan.logits_dtype), Result))
                out.append(r)
            if self.progress:
                self.progress(1)
        return out

    def evaluate_devices(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Test accuracy of each device's current small model (devices never evaluated: skipped)."""
        return {i: float(d.model.evaluate(x, y)) for i, d in self._devices.items() if d.model is not None}


def _litert_factory(arch: str, input_shape: tuple[int, ...]) -> SmallModel:
    from device_firmware_py.runtime.manifest import format_input
    from device_firmware_py.runtime.small_model import SmallModel

    return SmallModel(f"{arch}_{format_input(tuple(int(s) for s in input_shape))}", num_threads=1)
