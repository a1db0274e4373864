"""Collection: one round's results while it is collected, and THE accept decision.

Why here (not in the codec): whether a result is acceptable depends on what its device was
assigned — the contract can only check that a message is well formed. `Expectation` is what the
server derives from each device's assignment when it dispatches it; `check_result` compares a
decoded result against it, field by field, and raises a `ContractError` with a stable reason
(recorded like every other rejection). Nothing that fails here reaches a strategy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_firmware_py.contract.errors import ContractError
from device_firmware_py.contract.messages import Assignment, Result
from server_app.engine.types import hold_logits

# |logit| above this is no honest small model's output (float16 on the wire tops out at 65504).
LOGIT_BOUND = 1_000.0
# A device's weights may exceed the largest |value| of the weights it was sent by this factor
# (honest rounds move weights by a few x at most; a x1e36 poisoning is far beyond).
WEIGHT_BOUND_FACTOR = 100.0
MAX_SAMPLES = 100_000_000


@dataclass(frozen=True)
class Expectation:
    """What one device's result must look like, derived from its assignment."""

    model_version: int
    upload: frozenset[str]
    logits_rows: int | None  # rows of proxy_logits (the round's proxy subset or the whole set)
    num_classes: int
    weight_shapes: tuple[tuple[int, ...], ...] | None
    weight_bound: float | None  # max |w| allowed (None: weights not expected)
    proxy_digest: str | None
    arch: str

    @classmethod
    def from_assignment(
        cls, a: Assignment, *, num_classes: int, proxy_size: int, proxy_digest: str | None,
        weight_shapes: list[tuple[int, ...]] | None = None,
    ) -> Expectation:  # fmt: skip
        up = frozenset(a.plan.upload)
        rows = None
        if "logits" in up:
            rows = len(a.proxy_indices) if a.proxy_indices is not None else proxy_size
        shapes = bound = None
        if "weights" in up:
            ref = a.weights
            shapes = tuple(tuple(np.shape(w)) for w in ref) if ref is not None else tuple(map(tuple, weight_shapes or []))
            peak = max((float(np.max(np.abs(w))) for w in ref or [] if np.size(w)), default=0.0)
            bound = max(1.0, WEIGHT_BOUND_FACTOR * peak) if ref is not None else 1e4
        return cls(a.model_version, up, rows, num_classes, shapes, bound, proxy_digest, a.arch)

    def to_json(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "upload": sorted(self.upload), "logits_rows": self.logits_rows,
                "num_classes": self.num_classes,
                "weight_shapes": None if self.weight_shapes is None else [list(s) for s in self.weight_shapes],
                "weight_bound": self.weight_bound, "proxy_digest": self.proxy_digest, "arch": self.arch}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Expectation:
        shapes = d.get("weight_shapes")
        return cls(int(d["model_version"]), frozenset(d["upload"]), d.get("logits_rows"), int(d["num_classes"]),
                   None if shapes is None else tuple(tuple(int(x) for x in s) for s in shapes),
                   d.get("weight_bound"), d.get("proxy_digest"), str(d["arch"]))  # fmt: skip


def check_result(r: Result, e: Expectation) -> None:
    """Raise ContractError unless `r` is exactly what its assignment asked for."""
    if r.model_version != e.model_version:
        raise ContractError("stale_version", f"result answers model version {r.model_version}, assigned {e.model_version}")
    if r.arch != e.arch:
        raise ContractError("plan_mismatch", f"result from arch {r.arch!r}, assigned {e.arch!r}")
    if e.proxy_digest is not None and r.proxy_digest is not None and r.proxy_digest != e.proxy_digest:
        raise ContractError("bad_digest", "result computed on a different proxy set")
    has = {n for n, v in (("logits", r.proxy_logits), ("weights", r.weights)) if v is not None}
    if has != set(e.upload):
        raise ContractError("plan_mismatch", f"result carries {sorted(has)}, the plan asked for {sorted(e.upload)}")
    if not 1 <= r.num_samples <= MAX_SAMPLES:
        raise ContractError("out_of_bounds", f"num_samples {r.num_samples} not in [1, {MAX_SAMPLES}]")
    h = r.label_histogram
    if h is None or len(h) != e.num_classes:
        raise ContractError("bad_histogram", f"label_histogram must have {e.num_classes} entries, got "
                                             f"{None if h is None else len(h)}")  # fmt: skip
    if min(h) < 0 or sum(h) != r.num_samples:
        raise ContractError("bad_histogram", f"label_histogram sums to {sum(h)} (negative entries?), num_samples is {r.num_samples}")
    if r.proxy_logits is not None:
        want = (e.logits_rows, e.num_classes)
        if tuple(r.proxy_logits.shape) != want:
            raise ContractError("bad_shape", f"proxy_logits shape {tuple(r.proxy_logits.shape)} != expected {want}")
        peak = float(np.max(np.abs(r.proxy_logits))) if r.proxy_logits.size else 0.0
        if peak > LOGIT_BOUND:
            raise ContractError("out_of_bounds", f"|proxy_logits| reaches {peak:.3g} > {LOGIT_BOUND:g}")
    if r.weights is not None:
        got = tuple(tuple(w.shape) for w in r.weights)
        if e.weight_shapes is not None and got != e.weight_shapes:
            raise ContractError("bad_shape", "weight shapes differ from the assigned model's")
        peak = max((float(np.max(np.abs(w))) for w in r.weights if w.size), default=0.0)
        if e.weight_bound is not None and peak > e.weight_bound:
            raise ContractError("out_of_bounds", f"|weights| reaches {peak:.3g} > bound {e.weight_bound:.3g} "
                                                 "(derived from the global model)")  # fmt: skip


@dataclass
class Collection:
    """Results of one round while it is being collected; shared by the fleet and the ingestor."""

    round_id: int
    expect: dict[str, Expectation]  # device id -> what its result must look like
    deadline: float  # unix time
    sent_at: dict[str, float] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    received: int = 0
    rejected: int = 0
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    # False in an ingestion worker (`koala serve --role ingest`): it decides and persists, the
    # orchestrator reads the accepted rows; the worker holds no tensors (memory does not grow
    # with the fleet) and leaves closing to the orchestrator (see server_app.rounds.follower).
    keep_results: bool = True
    accepted: int = 0
    # where accepted tensors wait for aggregation (server_app.rounds.spill): None keeps them in
    # memory as float16 (`engine.types.hold_logits`)
    spill: Any = None

    def __post_init__(self) -> None:
        self.participants: frozenset[str] = frozenset(self.expect)

    def expired(self, now: float | None = None) -> bool:
        """Past the deadline. A worker's copy never expires by its own clock: the orchestrator
        extends deadlines and closes the round in the registry, which is what the claim checks."""
        if not self.keep_results:
            return False
        return (time.time() if now is None else now) > self.deadline

    def to_json(self) -> dict[str, Any]:
        """What an ingestion worker needs to judge results: expectations grouped (a fleet shares a
        handful of distinct ones), deadline for information."""
        groups: dict[Expectation, list[str]] = {}
        for dev, e in self.expect.items():
            groups.setdefault(e, []).append(dev)
        return {"round_id": self.round_id, "deadline": self.deadline,
                "groups": [{"expect": e.to_json(), "devices": sorted(devs)} for e, devs in groups.items()]}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any], *, keep_results: bool = False) -> Collection:
        expect = {dev: e for g in d["groups"] for e in [Expectation.from_json(g["expect"])] for dev in g["devices"]}
        return cls(round_id=int(d["round_id"]), expect=expect, deadline=float(d["deadline"]), keep_results=keep_results)

    def check(self, r: Result) -> None:
        """The accept decision for a decoded result (round, participant, then its expectation)."""
        if r.round_id != self.round_id:
            raise ContractError("wrong_round", f"result for round {r.round_id}, collecting round {self.round_id}")
        e = self.expect.get(r.device_id)
        if e is None:
            raise ContractError("unknown_device", f"{r.device_id} is not a participant of round {self.round_id}")
        check_result(r, e)

    def add(self, result: Result, nbytes: int) -> bool:
        """Fold in an accepted result; False when the collection already closed (-> late)."""
        with self.cond:
            if self.closed:
                return False
            self.accepted += 1
            if not self.keep_results:
                return True
            self.keep(result)
            self.received_at.setdefault(result.device_id, time.time())
            self.bytes_up.setdefault(result.device_id, nbytes)
            self.cond.notify_all()
            return True

    def keep(self, result: Result) -> None:
        """Hold an accepted result until aggregation (the first one per device): tensors spilled
        to disk when the round has a spill, else compacted in memory. Caller holds `cond`
        (or owns the collection alone)."""
        if result.device_id in self.results:
            return
        self.results[result.device_id] = self.spill.put(result) if self.spill is not None else hold_logits(result)

    def complete(self) -> bool:
        # Called on every wake-up of the waiting round (one per accepted result): the length test
        # keeps it O(1) until the last results, instead of an O(N) set build each time (O(N^2)).
        return len(self.results) >= len(self.participants) and self.participants <= self.results.keys()
