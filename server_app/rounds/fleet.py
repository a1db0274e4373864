"""MqttFleet: the engine's `Fleet` protocol over MQTT, so `run_rounds` drives real devices.

`devices()` = the devices currently online (presence from retained status + Last Will).
`run_round(assignments, quorum, timeout_s)`:
  1. open a `Collection` for the round (participants, deadline, expected shapes) and record the
     assignments in the registry;
  2. publish one binary assignment frame per device (QoS 1);
  3. wait until every participant's result is in or the deadline passes — results arrive via
     `server_app.ingest.Ingestor`, which validates and hands accepted ones to the collection;
  4. close the collection (later results are recorded `late`), mark silent devices `dropped`;
  5. below quorum -> `QuorumNotMet` (the orchestrator fails the round cleanly), else return the
     accepted `Result`s in participant order.

No KD math here and no DB schema knowledge: the registry is reached through `RoundStore`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from device_firmware_py.agent.wire import assignment_to_wire
from device_firmware_py.contract import codec, topics
from server_app.engine.types import Assignment, DeviceInfo, Result

log = logging.getLogger("koala.fleet")


class QuorumNotMet(RuntimeError):
    """Fewer accepted results than the quorum when the round closed."""

    def __init__(self, round_id: int, accepted: int, quorum: int):
        super().__init__(f"round {round_id}: {accepted} accepted < quorum {quorum}")
        self.round_id, self.accepted, self.quorum = round_id, accepted, quorum


class RoundAborted(RuntimeError):
    """The server is stopping: the round ends without a decision (resumed on restart)."""


class RoundStore(Protocol):
    """What the fleet writes to the registry (implemented in server_app.orchestrator)."""

    def assignments_sent(self, round_id: int, sent: dict[str, int], deadline: float) -> None: ...
    def accepted_results(self, round_id: int) -> dict[str, Result]: ...
    def close_collection(self, round_id: int, missing: list[str]) -> None: ...
    def collection_closed(self, round_id: int) -> bool: ...


@dataclass
class Collection:
    """Results of one round while it is being collected; shared by the fleet and the ingestor."""

    round_id: int
    participants: frozenset[str]
    deadline: float  # unix time
    logits_shape: tuple[int, int] | None  # expected proxy logits shape, when logits are uploaded
    weight_shapes: dict[str, list[tuple[int, ...]]] | None  # arch -> shapes, when weights are uploaded
    proxy_digest: str | None
    sent_at: dict[str, float] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    received: int = 0
    rejected: int = 0
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline

    def add(self, result: Result, nbytes: int) -> bool:
        """Fold in an accepted result; False when the collection already closed (-> late)."""
        with self.cond:
            if self.closed:
                return False
            self.results.setdefault(result.device_id, result)
            self.received_at.setdefault(result.device_id, time.time())
            self.bytes_up.setdefault(result.device_id, nbytes)
            self.cond.notify_all()
            return True

    def complete(self) -> bool:
        # Called on every wake-up of the waiting round (one per accepted result): the length test
        # keeps it O(1) until the last results, instead of an O(N) set build each time (O(N^2)).
        return len(self.results) >= len(self.participants) and self.participants <= self.results.keys()


class MqttFleet:
    """Implements `server_app.engine.fleet.Fleet` over a broker.

    publish(topic, payload, qos, retain) is the server MQTT client's publish; `online` returns the
    presence tracker's online DeviceInfos; `on_state(round_id, state, **info)` reports transitions
    (the orchestrator writes them to the DB and publishes the retained round status).
    """

    def __init__(
        self,
        publish: Callable[[str, bytes, int, bool], Any],
        online: Callable[[], list[DeviceInfo]],
        store: RoundStore,
        *,
        proxy_shape: tuple[int, int],
        proxy_digest: str | None,
        weight_shapes: Callable[[str], list[tuple[int, ...]]] | None = None,
        default_timeout_s: float = 120.0,
        quorum_fraction: float | None = None,
        on_state: Callable[..., None] | None = None,
        max_devices: int | None = None,
    ):
        self._publish = publish
        self._online = online
        self.store = store
        self.proxy_shape = proxy_shape
        self.proxy_digest = proxy_digest
        self._weight_shapes = weight_shapes
        self.default_timeout_s = default_timeout_s
        self.quorum_fraction = quorum_fraction
        self._on_state = on_state or (lambda *a, **k: None)
        self.max_devices = max_devices
        self._lock = threading.Lock()
        self._collection: Collection | None = None
        self._abort = threading.Event()
        self._shutdown = False
        self.last_stats: dict[str, Any] = {}

    # ----------------------------------------------------------- Fleet API
    def devices(self) -> list[DeviceInfo]:
        devs = sorted(self._online(), key=lambda d: d.device_id)
        return devs[: self.max_devices] if self.max_devices else devs

    @property
    def collection(self) -> Collection | None:
        with self._lock:
            return self._collection

    def abort(self, shutdown: bool = False) -> None:
        """Wake a waiting run_round and make it raise RoundAborted (operator stop, or shutdown: for good)."""
        self._shutdown = self._shutdown or shutdown
        self._abort.set()
        c = self.collection
        if c is not None:
            with c.cond:
                c.cond.notify_all()

    def effective_quorum(self, engine_quorum: int, n_assigned: int) -> int:
        if self.quorum_fraction is None:
            return min(engine_quorum, n_assigned)
        return max(1, min(n_assigned, math.ceil(self.quorum_fraction * n_assigned)))

    def run_round(self, assignments: list[Assignment], quorum: int, timeout_s: float | None) -> list[Result]:
        if not assignments:
            raise QuorumNotMet(-1, 0, max(quorum, 1))
        if not self._shutdown:
            self._abort.clear()
        round_id = assignments[0].round_id
        timeout = float(timeout_s if timeout_s is not None else self.default_timeout_s)
        deadline = time.time() + timeout
        uploads = {u for a in assignments for u in _upload(a)}
        col = Collection(
            round_id=round_id,
            participants=frozenset(a.device_id for a in assignments),
            deadline=deadline,
            logits_shape=self.proxy_shape if "logits" in uploads else None,
            weight_shapes=(
                {a.arch: self._expected_weights(a) for a in assignments} if "weights" in uploads else None
            ),
            proxy_digest=self.proxy_digest,
        )
        # A resumed round keeps what was accepted before the restart (the tensors are on disk).
        for dev, res in self.store.accepted_results(round_id).items():
            col.results[dev] = res
            col.received_at[dev] = time.time()
        if self.store.collection_closed(round_id):
            # Resumed after the collection closed (server died while aggregating): re-aggregate.
            q = self.effective_quorum(quorum, len(col.results))
            if len(col.results) < max(q, 1):
                raise QuorumNotMet(round_id, len(col.results), max(q, 1))
            return [col.results[d] for d in sorted(col.results)]
        with self._lock:
            self._collection = col
        try:
            return self._run(col, assignments, quorum, deadline)
        finally:
            with self._lock:
                self._collection = None

    # ------------------------------------------------------------ internals
    def _expected_weights(self, a: Assignment) -> list[tuple[int, ...]]:
        if a.weights is not None:
            return [tuple(np.shape(w)) for w in a.weights]
        if self._weight_shapes is None:
            raise ValueError("weights upload asked but the fleet cannot know the expected shapes")
        return self._weight_shapes(a.arch)

    def _run(self, col: Collection, assignments: list[Assignment], quorum: int, deadline: float) -> list[Result]:
        t0 = time.perf_counter()
        # Headers per device, bodies once per distinct tensor set (the teacher logits are shared):
        # identical bytes to codec.encode_frame per device, without N float16 conversions + sha256.
        encoder = codec.FrameEncoder()
        parts: dict[str, tuple[bytes, bytes]] = {}
        for a in assignments:
            if a.device_id in col.results:
                continue  # resumed round: this device already delivered
            parts[a.device_id] = encoder.parts(assignment_to_wire(a, proxy_digest=self.proxy_digest, deadline=deadline))
        sizes = {dev: len(head) + len(body) for dev, (head, body) in parts.items()}
        t_encode = time.perf_counter() - t0
        self.store.assignments_sent(col.round_id, sizes, deadline)
        for dev, (head, body) in parts.items():
            col.sent_at[dev] = time.time()
            # Whole frames exist only while the MQTT client holds them (until PUBACK), not all round.
            self._publish(topics.device_assign(dev), head + body, 1, False)
        del parts
        _bytes_down(sum(sizes.values()))
        self._on_state(col.round_id, "collecting", participants=sorted(col.participants), deadline=deadline)
        log.info("round dispatched round=%d devices=%d bytes_per_assign=%s deadline_in_s=%.1f", col.round_id,
                 len(sizes), _mean(list(sizes.values())), deadline - time.time())
        with col.cond:
            while not col.complete() and not col.expired() and not self._abort.is_set():
                col.cond.wait(timeout=max(0.05, min(1.0, deadline - time.time())))
            col.closed = True
        if self._abort.is_set():
            raise RoundAborted(f"round {col.round_id} aborted by shutdown")
        missing = sorted(col.participants - set(col.results))
        self.store.close_collection(col.round_id, missing)
        self._stats(col, sizes, t_encode, time.perf_counter() - t0)
        q = self.effective_quorum(quorum, len(col.participants))
        if len(col.results) < q:
            raise QuorumNotMet(col.round_id, len(col.results), q)
        self._on_state(col.round_id, "aggregating")
        order = [a.device_id for a in assignments if a.device_id in col.results]
        order += sorted(set(col.results) - set(order))
        return [col.results[d] for d in order]

    def _stats(self, col: Collection, sizes: dict[str, int], t_encode: float, t_collect: float) -> None:
        """Wall-time split of the collection: device compute (reported) vs. everything else."""
        compute, transfer = [], []
        for dev, res in col.results.items():
            c = res.metrics.get("t_device_s")
            if dev in col.sent_at and dev in col.received_at and isinstance(c, (int, float)):
                compute.append(float(c))
                transfer.append(max(0.0, col.received_at[dev] - col.sent_at[dev] - float(c)))
        self.last_stats = {
            "participants": len(col.participants),
            "accepted": len(col.results),
            "missing": len(col.participants) - len(col.results),
            "rejected": col.rejected,
            "bytes_assign_msg": _mean(list(sizes.values())),
            "bytes_result_msg": _mean(list(col.bytes_up.values())),
            "bytes_down_total": sum(sizes.values()),
            "bytes_up_total": sum(col.bytes_up.values()),
            "t_encode_s": t_encode,
            "t_collect_s": t_collect,
            "t_device_compute_mean_s": _mean(compute),
            "t_device_compute_max_s": max(compute) if compute else 0.0,
            "t_transfer_mean_s": _mean(transfer),
        }


def _bytes_down(n: int) -> None:
    try:
        from server_app import metrics

        metrics.bytes_down(n)
    except ImportError:
        pass


def _upload(a: Assignment) -> set[str]:
    from device_firmware_py.task import DEFAULT_HYPER

    up = (a.hyper or {}).get("upload", DEFAULT_HYPER["upload"])
    return set(up.split(",") if isinstance(up, str) else up)


def _mean(xs: list[float] | list[int]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
