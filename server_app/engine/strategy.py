"""Strategy base (Flower-style): the algorithm decides what each device does and what to do with
what comes back; it never talks to a transport. The strategy owns the large model.

Every strategy is configured by one `server_app.policy.KoalaPolicy` and exposes its whole state
publicly (`state_dict` / `load_state`), so checkpoints never read private fields. It also owns
participant sampling (`sample`) and the one quorum rule (`quorum`), so the simulated and the
deployed round loop pick the same devices and close rounds by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from device_firmware_py.contract.plan import TrainingPlan
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport
from server_app.policy import KoalaPolicy

# A device simulator runs an assignment whose work a real device cannot do (e.g. train the torch
# large model for the FedAvg-large baseline): (assignment, x_private, y_private) -> Result.
DeviceSimulator = Callable[[Assignment, np.ndarray, np.ndarray], Result]


def quorum_for(n_assigned: int, fraction: float) -> int:
    """THE quorum rule: ceil(fraction x assigned), at least 1, at most all."""
    return max(1, min(n_assigned, math.ceil(fraction * n_assigned - 1e-9)))


def device_seed(base: int, round_id: int, index: int) -> int:
    """Distinct, reproducible seed per (run, round, device)."""
    return int(base) * 1_000_003 + round_id * 1009 + index


class RoundRejected(RuntimeError):
    """A round's aggregate was refused (e.g. the model gate): the previous model stays current."""


class ParticipantSampler:
    """Picks a round's participants: seeded, and fair across rounds (least often picked first,
    ties broken by a per-round random order), like Flower's client sampling but with a memory, so
    that over k rounds every device of a stable fleet is picked k x n/N times (+-1)."""

    def __init__(self, participants: float | None, seed: int):
        self.participants, self.seed = participants, seed
        self.picked: dict[str, int] = {}

    def count(self, n_online: int) -> int:
        p = self.participants
        if p is None:
            return n_online
        k = int(p) if p >= 1 else math.ceil(p * n_online)
        return max(1, min(n_online, k))

    def sample(self, round_id: int, devices: list[DeviceInfo]) -> list[DeviceInfo]:
        devices = sorted(devices, key=lambda d: d.device_id)
        k = self.count(len(devices))
        if k >= len(devices):
            chosen = devices
        else:
            order = np.random.default_rng([self.seed, round_id, 4242]).permutation(len(devices))
            rank = {d.device_id: int(r) for d, r in zip(devices, order, strict=True)}
            chosen = sorted(devices, key=lambda d: (self.picked.get(d.device_id, 0), rank[d.device_id]))[:k]
            chosen.sort(key=lambda d: d.device_id)
        for d in chosen:
            self.picked[d.device_id] = self.picked.get(d.device_id, 0) + 1
        return chosen


class Strategy:
    """Base class. Subclasses implement `configure_round` and `aggregate` and declare `USES`,
    the policy fields they read (an explicitly set field outside it is a policy error)."""

    name: str = "strategy"
    mode: str = "baseline"  # "homo" | "hetero" | "baseline"
    large_model: Any = None  # torch.nn.Module or None
    USES: frozenset[str] = frozenset()

    def __init__(self, policy: KoalaPolicy | None = None):
        self.policy = policy or KoalaPolicy()
        self.sampler = ParticipantSampler(self.policy.participants, self.policy.seed)
        self.version = 0  # large-model (or global model) version; +1 per aggregated round

    @classmethod
    def policy_fields(cls, policy: KoalaPolicy) -> frozenset[str]:
        """Policy fields this strategy reads under `policy` (may depend on e.g. the teacher)."""
        return cls.USES

    def plan(self, task: str, round_id: int, index: int, upload: tuple[str, ...]) -> TrainingPlan:
        """The device's typed plan, straight from the policy (one place maps policy -> plan)."""
        p = self.policy
        return TrainingPlan(task=task, local_epochs=p.local_epochs, lr=p.lr, fkd_epochs=p.fkd_epochs, fkd_lr=p.fkd_lr,
                            post_fkd_epochs=p.post_fkd_epochs, temperature=p.temperature, upload=upload,
                            logits_dtype=p.logits_dtype,
                            seed=device_seed(p.seed, round_id, index))  # fmt: skip

    def sample(self, round_id: int, devices: list[DeviceInfo]) -> list[DeviceInfo]:
        return self.sampler.sample(round_id, devices)

    def configure_round(self, round_id: int, devices: list[DeviceInfo]) -> list[Assignment]:
        raise NotImplementedError

    def aggregate(self, round_id: int, results: list[Result]) -> RoundReport:
        raise NotImplementedError

    def global_small_weights(self) -> dict[str, list[np.ndarray]]:
        """arch -> current global small weights, where the strategy keeps one (FedAvg variants)."""
        return {}

    def device_simulators(self) -> dict[str, DeviceSimulator]:
        """task name -> in-process simulator, for tasks real devices cannot run."""
        return {}

    def quorum(self, n_assigned: int) -> int:
        """Accepted results needed to close a round of `n_assigned` devices."""
        return quorum_for(n_assigned, self.policy.quorum_fraction)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart (numpy / torch tensors and plain data)."""
        state: dict[str, Any] = {"version": self.version, "picked": dict(self.sampler.picked),
                                 "small": {a: [np.asarray(w) for w in ws] for a, ws in self.global_small_weights().items()}}
        if self.large_model is not None:
            state["large"] = {k: v.detach().cpu() for k, v in self.large_model.state_dict().items()}
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.version = int(state.get("version", 0))
        self.sampler.picked = {str(k): int(v) for k, v in state.get("picked", {}).items()}
        if self.large_model is not None and state.get("large") is not None:
            self.large_model.load_state_dict(state["large"])
        self.set_global_small_weights({a: list(ws) for a, ws in state.get("small", {}).items()})

    def set_global_small_weights(self, small: dict[str, list[np.ndarray]]) -> None:
        """Restore what `global_small_weights` returned (no-op for strategies without one)."""
