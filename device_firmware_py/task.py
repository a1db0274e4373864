"""What a device does with one round assignment: the ONE device-side algorithm.

Used unchanged by the in-memory simulated fleet (server_app.engine.fleet) and by the MQTT device
agent, so it imports only numpy and device_firmware_py (no torch, no server_app). The wire-level
dataclasses `Assignment` and `DeviceResult` are defined here once; `server_app.engine.types`
re-exports them.

Order of work (KOALA, design §2): load global weights if sent -> forward KD from the large model's
proxy logits (teacher) -> local cross-entropy training on private data -> upload proxy logits
and/or weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Defaults where the paper is silent (all configurable through Assignment.hyper).
DEFAULT_HYPER: dict[str, Any] = {
    "local_epochs": 1,
    "lr": 1e-3,
    "kd_epochs": 1,  # forward-KD passes over the proxy set
    "kd_lr": 1e-3,
    "temperature": 1.0,
    "upload": ["logits"],  # any of "logits", "weights"
    "seed": 0,
    "post_kd_epochs": 0,  # extra forward-KD passes AFTER local training (keeps devices near the teacher)
    "proxy_indices": None,  # this round's subset of the proxy set (None: all of it)
}


@dataclass
class Assignment:
    """Server -> device, one per device per round."""

    round_id: int
    device_id: str
    arch: str
    model_version: int = 0
    task: str = "koala"  # "koala" | "fedavg_small" | "local_only" | "fedavg_large"
    hyper: dict[str, Any] = field(default_factory=dict)
    teacher_logits: np.ndarray | None = None  # [P, C] large-model logits on the proxy set
    weights: list[np.ndarray] | None = None  # global weights to load first
    deadline_s: float | None = None

    def param(self, key: str) -> Any:
        return self.hyper.get(key, DEFAULT_HYPER[key])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assignment:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class DeviceResult:
    """Device -> server."""

    round_id: int
    device_id: str
    arch: str
    num_samples: int
    proxy_logits: np.ndarray | None = None  # [P, C] float32 (float16 on the wire)
    weights: list[np.ndarray] | None = None
    label_histogram: list[int] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(y, np.int64).reshape(-1), minlength=num_classes)[:num_classes].tolist()


def execute_assignment(
    model: Any,
    x_private: np.ndarray,
    y_private: np.ndarray,
    proxy_x: np.ndarray | None,
    assignment: Assignment | dict[str, Any],
) -> DeviceResult:
    """Run one round on a device's SmallModel; returns what the device uploads.

    `model` is a `device_firmware_py.runtime.small_model.SmallModel` (duck-typed so tests of the
    agent can pass the real runtime without importing it here).
    """
    a = assignment if isinstance(assignment, Assignment) else Assignment.from_dict(assignment)
    seed = int(a.param("seed"))
    metrics: dict[str, Any] = {}
    if proxy_x is not None and a.param("proxy_indices") is not None:
        proxy_x = proxy_x[np.asarray(a.param("proxy_indices"), np.int64)]
    if a.weights is not None:
        model.set_weights(a.weights)
    if a.teacher_logits is not None:
        if proxy_x is None:
            raise ValueError("teacher logits sent but the device has no proxy inputs")
        t0 = time.perf_counter()
        metrics["distill_loss"] = model.distill(
            proxy_x, a.teacher_logits, temperature=float(a.param("temperature")),
            epochs=int(a.param("kd_epochs")), lr=float(a.param("kd_lr")), seed=seed,
        )  # fmt: skip
        metrics["t_distill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if int(a.param("local_epochs")) > 0 and len(y_private):
        metrics["train_loss"] = model.train(
            x_private, y_private, epochs=int(a.param("local_epochs")), lr=float(a.param("lr")), seed=seed + 1
        )
    metrics["t_train_s"] = time.perf_counter() - t0
    if a.teacher_logits is not None and int(a.param("post_kd_epochs")) > 0:
        model.distill(
            proxy_x, a.teacher_logits, temperature=float(a.param("temperature")),
            epochs=int(a.param("post_kd_epochs")), lr=float(a.param("kd_lr")), seed=seed + 2,
        )  # fmt: skip
    upload = set(a.param("upload"))
    result = DeviceResult(
        round_id=a.round_id, device_id=a.device_id, arch=a.arch, num_samples=int(len(y_private)),
        label_histogram=label_histogram(y_private, model.num_classes), metrics=metrics,
    )  # fmt: skip
    if "logits" in upload:
        if proxy_x is None:
            raise ValueError("logits upload asked but the device has no proxy inputs")
        t0 = time.perf_counter()
        result.proxy_logits = model.logits(proxy_x).astype(np.float32)
        metrics["t_logits_s"] = time.perf_counter() - t0
    if "weights" in upload:
        result.weights = model.get_weights()
    if len(y_private):
        metrics["local_acc"] = model.evaluate(x_private, y_private)
    return result
