"""1:1 conversion between wire messages and the engine's dataclasses (device_firmware_py.task).

Why here: both the MQTT device agent and the server's MqttFleet convert, and the engine types must
not learn about the wire. Conversion is by field name, so the engine classes stay plain.
The one semantic difference: the engine carries `deadline_s` (seconds from dispatch) while the wire
carries `deadline` (absolute unix time), because a relative deadline means nothing after a message
sat in a broker queue while the device was offline.
"""

from __future__ import annotations

import time
from typing import Any

from .messages import Assignment, DeviceStatus, Result


def assignment_from_engine(
    a: Any, *, proxy_digest: str | None = None, now: float | None = None, deadline: float | None = None
) -> Assignment:
    """Engine Assignment -> wire Assignment; `deadline` (absolute) overrides now + a.deadline_s."""
    if deadline is None and getattr(a, "deadline_s", None) is not None:
        deadline = (time.time() if now is None else now) + float(a.deadline_s)
    return Assignment(
        round_id=a.round_id,
        device_id=a.device_id,
        arch=a.arch,
        model_version=a.model_version,
        task=a.task,
        hyper=dict(a.hyper or {}),
        deadline=deadline,
        proxy_digest=proxy_digest,
        teacher_logits=a.teacher_logits,
        weights=None if a.weights is None else list(a.weights),
    )


def assignment_to_engine(msg: Assignment, *, now: float | None = None, cls: type | None = None) -> Any:
    """Wire Assignment -> engine Assignment (deadline_s = seconds left, never negative)."""
    if cls is None:
        from device_firmware_py.task import Assignment as cls  # noqa: N813 - the engine class
    left = None if msg.deadline is None else max(0.0, msg.deadline - (time.time() if now is None else now))
    return cls(
        round_id=msg.round_id,
        device_id=msg.device_id,
        arch=msg.arch,
        model_version=msg.model_version,
        task=msg.task,
        hyper=dict(msg.hyper),
        teacher_logits=msg.teacher_logits,
        weights=msg.weights,
        deadline_s=left,
    )


def result_from_engine(r: Any, *, model_version: int = 0, proxy_digest: str | None = None) -> Result:
    """Engine DeviceResult -> wire Result (validates: NaN logits are refused here, on the device)."""
    return Result(
        round_id=r.round_id,
        device_id=r.device_id,
        arch=r.arch,
        num_samples=r.num_samples,
        model_version=model_version,
        label_histogram=None if r.label_histogram is None else list(r.label_histogram),
        metrics=dict(r.metrics or {}),
        proxy_digest=proxy_digest,
        proxy_logits=r.proxy_logits,
        weights=None if r.weights is None else list(r.weights),
    )


def result_to_engine(msg: Result, *, cls: type | None = None) -> Any:
    """Wire Result -> engine DeviceResult."""
    if cls is None:
        from device_firmware_py.task import DeviceResult as cls  # noqa: N813
    return cls(
        round_id=msg.round_id,
        device_id=msg.device_id,
        arch=msg.arch,
        num_samples=msg.num_samples,
        proxy_logits=msg.proxy_logits,
        weights=msg.weights,
        label_histogram=msg.label_histogram,
        metrics=dict(msg.metrics),
    )


def device_info_fields(status: DeviceStatus) -> dict[str, Any]:
    """Keyword arguments for server_app.engine.types.DeviceInfo from a device's status message."""
    return {
        "device_id": status.device_id,
        "arch": status.arch or "",
        "num_samples": status.num_samples or 0,
        "label_histogram": status.label_histogram,
    }
