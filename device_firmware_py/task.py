"""What a device does with one round assignment: the ONE device-side algorithm.

Used unchanged by the in-memory simulated fleet (server_app.engine.fleet) and by the MQTT device
agent, so it imports only numpy and device_firmware_py (no torch, no server_app). It takes and
returns the contract's own messages (`contract.messages.Assignment` / `Result`): there is one
definition of each, used by the engine, the wire and the device.

Order of work (KOALA, design §2), as the assignment's `TrainingPlan` says: load global weights if
sent -> forward KD from the large model's proxy logits (teacher) -> local cross-entropy training
on private data -> optional forward KD again -> upload proxy logits and/or weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_firmware_py.contract.messages import Assignment, Result, metrics_clean
from device_firmware_py.datafiles import drop_pages, read_rows

__all__ = ["Assignment", "Result", "Progress", "execute_assignment", "label_histogram"]

# progress(phase, step, total, loss): called after every training step and at each phase change
# (phases "distill", "train", "post_distill", "logits"); the caller decides how often to report.
Progress = Callable[[str, int, int, "float | None"], None]


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(y, np.int64).reshape(-1), minlength=num_classes)[:num_classes].tolist()


def execute_assignment(
    model: Any,
    x_private: np.ndarray,
    y_private: np.ndarray,
    proxy_x: np.ndarray | None,
    assignment: Assignment,
    *,
    proxy_digest: str | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run one round on a device's SmallModel; returns what the device uploads.

    `model` is a `device_firmware_py.runtime.small_model.SmallModel` (duck-typed so tests of the
    agent can pass the real runtime without importing it here). The result answers the
    assignment's model version and echoes its proxy digest unless `proxy_digest` is given.
    """
    a, plan = assignment, assignment.plan
    seed = plan.seed

    def steps(phase: str) -> Any:
        if progress is None:
            return None
        return lambda step, total, loss: progress(phase, step, total, loss)

    metrics: dict[str, Any] = {}
    if proxy_x is not None and a.proxy_indices is not None:
        if int(a.proxy_indices[-1]) >= len(proxy_x):
            raise ValueError(f"proxy_indices reach {int(a.proxy_indices[-1])}, the device holds {len(proxy_x)} proxy inputs")
        proxy_x = read_rows(proxy_x, a.proxy_indices)
    if a.weights is not None:
        model.set_weights(a.weights)
    if a.teacher_logits is not None:
        if proxy_x is None:
            raise ValueError("teacher logits sent but the device has no proxy inputs")
        t0 = time.perf_counter()
        metrics["distill_loss"] = model.distill(
            proxy_x, a.teacher_logits, temperature=plan.temperature,
            epochs=plan.fkd_epochs, lr=plan.fkd_lr, seed=seed, on_step=steps("distill"),
        )  # fmt: skip
        metrics["t_distill_s"] = time.perf_counter() - t0
        drop_pages(proxy_x)  # memory-mapped inputs: this phase's pages leave the process (not the page cache)
    t0 = time.perf_counter()
    if plan.local_epochs > 0 and len(y_private):
        metrics["train_loss"] = model.train(x_private, y_private, epochs=plan.local_epochs, lr=plan.lr, seed=seed + 1,
                                            on_step=steps("train"))  # fmt: skip
    metrics["t_train_s"] = time.perf_counter() - t0
    drop_pages(x_private)
    if a.teacher_logits is not None and plan.post_fkd_epochs > 0:
        model.distill(
            proxy_x, a.teacher_logits, temperature=plan.temperature,
            epochs=plan.post_fkd_epochs, lr=plan.fkd_lr, seed=seed + 2, on_step=steps("post_distill"),
        )  # fmt: skip
        drop_pages(proxy_x)
    proxy_logits = weights = None
    if "logits" in plan.upload:
        if proxy_x is None:
            raise ValueError("logits upload asked but the device has no proxy inputs")
        if progress is not None:
            progress("logits", 0, len(proxy_x), None)
        t0 = time.perf_counter()
        proxy_logits = model.logits(proxy_x).astype(np.float32)
        metrics["t_logits_s"] = time.perf_counter() - t0
        drop_pages(proxy_x)
    if "weights" in plan.upload:
        weights = model.get_weights()
    if len(y_private):
        metrics["local_acc"] = model.evaluate(x_private, y_private)
    return Result(
        round_id=a.round_id, device_id=a.device_id, arch=a.arch, num_samples=int(len(y_private)),
        model_version=a.model_version,
        label_histogram=label_histogram(y_private, model.num_classes), metrics=metrics_clean(metrics),
        proxy_digest=a.proxy_digest if proxy_digest is None else proxy_digest,
        proxy_logits=proxy_logits, weights=weights,
    )  # fmt: skip
