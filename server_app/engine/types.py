"""Engine data types. `Assignment` and `Result` are the contract's own messages
(`device_firmware_py.contract.messages`, validated on construction, with the typed
`TrainingPlan`), re-exported here: the engine, the wire and the device share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_firmware_py.contract.codec import ITEMSIZE
from device_firmware_py.contract.messages import Assignment, Result
from device_firmware_py.contract.plan import TrainingPlan

__all__ = ["Assignment", "DeviceInfo", "Result", "TrainingPlan", "RoundReport", "payload_nbytes", "hold_logits", "LOGITS_WIRE_BYTES"]

# Teacher logits travel as float16 on the wire (design §3), a device's proxy logits in its plan's
# `logits_dtype`; weights as float32.
LOGITS_WIRE_BYTES = 2
WEIGHTS_WIRE_BYTES = 4


@dataclass
class DeviceInfo:
    """What the server knows about a device."""

    device_id: str
    arch: str
    num_samples: int
    label_histogram: list[int] | None = None


@dataclass
class RoundReport:
    """What a strategy returns after aggregating one round."""

    round_id: int
    metrics: dict[str, Any] = field(default_factory=dict)
    num_results: int = 0
    device_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def payload_nbytes(msg: Assignment | Result, logits_dtype: str | None = None) -> int:
    """Tensor bytes of one message as encoded on the wire (headers/JSON excluded); a result's
    logits in `logits_dtype` (its assignment's plan says which), else float16."""
    total = 0
    logits = msg.teacher_logits if isinstance(msg, Assignment) else msg.proxy_logits
    if logits is not None:
        total += int(np.asarray(logits).size) * (ITEMSIZE[logits_dtype] if logits_dtype else LOGITS_WIRE_BYTES)
    if msg.weights is not None:
        total += sum(int(np.asarray(w).size) for w in msg.weights) * WEIGHTS_WIRE_BYTES
    if isinstance(msg, Assignment) and msg.proxy_indices is not None:
        total += len(msg.proxy_indices) * 4  # int32 indices of this round's proxy subset
    return total


def hold_logits(r: Result) -> Result:
    """A result as the server holds it until aggregation: logits as float16 (half of float32;
    what devices send by default, so lossless for them — a float32 upload is rounded to float16,
    whose range covers the accept check's logit bound, and an int8 one is rounded after its scale is applied).
    The deployed collection and the simulated fleet both call this, so they hold the same values.
    Every consumer computes in float64 (probability.sanitize_logits)."""
    if r.proxy_logits is not None and r.proxy_logits.dtype != np.float16:
        r.proxy_logits = r.proxy_logits.astype(np.float16)
    return r
