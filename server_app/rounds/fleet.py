"""MqttFleet: the engine's `Fleet` protocol over MQTT, so `run_rounds` drives real devices.

`devices()` = the devices currently online (presence from retained status + Last Will) that hold data.
`run_round(assignments, quorum, timeout_s)`:
  1. open a `Collection` for the round (what each participant's result must look like, derived
     from its assignment; deadline) and record the assignments in the registry;
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from device_firmware_py.contract import codec, topics
from server_app.engine.types import Assignment, DeviceInfo, Result
from server_app.metrics_hook import record
from server_app.rounds.collection import Collection, Expectation
from server_app.rounds.deadlines import DeadlinePlanner, alive
from server_app.rounds.spill import ResultSpill

if TYPE_CHECKING:
    from server_app.submission_log import SegmentIndex

log = logging.getLogger("koala.fleet")
EXTEND_AHEAD_S = 0.5  # how long before its deadline a round checks whether to extend it
SYNC_S = 0.5  # how often a collecting round reads accepts made by other processes from the registry
PUBLISH_WINDOW = 256  # assignment frames queued in the MQTT client at most (about; see _run)
PUBLISH_WAIT_S = 30.0  # how long one window waits for the broker (then goes on: paho keeps queueing)


class QuorumNotMet(RuntimeError):
    """Fewer accepted results than the quorum when the round closed."""

    def __init__(self, round_id: int, accepted: int, quorum: int):
        super().__init__(f"round {round_id}: {accepted} accepted < quorum {quorum}")
        self.round_id, self.accepted, self.quorum = round_id, accepted, quorum


class RoundAborted(RuntimeError):
    """The server is stopping: the round ends without a decision (resumed on restart)."""


class Publish(Protocol):
    """MqttClient.publish: queue a message; with wait_s, block until the broker acknowledged it."""

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, /, *,
                 wait_s: float | None = None) -> object: ...  # fmt: skip


class RoundStore(Protocol):
    """What the fleet writes to the registry (implemented in server_app.rounds.orchestrator)."""

    def assignments_sent(self, round_id: int, sent: dict[str, int], deadline: float) -> None: ...
    def accepted_results(self, round_id: int) -> dict[str, Result]: ...
    def close_collection(self, round_id: int, missing: list[str]) -> None: ...
    def accepted_digests(self, round_id: int, known: int = -1) -> dict[str, str | None] | None: ...
    def segment_index(self, round_id: int) -> SegmentIndex: ...
    def save_collection(self, col: Collection) -> None: ...
    def collection_closed(self, round_id: int) -> bool: ...


class MqttFleet:
    """Implements `server_app.engine.fleet.Fleet` over a broker.

    publish(topic, payload, qos, retain) is the server MQTT client's publish; `online` returns the
    presence tracker's online DeviceInfos; `on_state(round_id, state, **info)` reports transitions
    (the orchestrator writes them to the DB and publishes the retained round status).
    """

    def __init__(
        self,
        publish: Publish,
        online: Callable[[], list[DeviceInfo]],
        store: RoundStore,
        *,
        num_classes: int,
        proxy_size: int,
        proxy_digest: str | None,
        weight_shapes: Callable[[str], list[tuple[int, ...]]] | None = None,
        default_timeout_s: float = 120.0,
        on_state: Callable[..., None] | None = None,
        max_devices: int | None = None,
        planner: DeadlinePlanner | None = None,
        progress_of: Callable[[str], dict[str, Any] | None] | None = None,
        publish_window: int | None = PUBLISH_WINDOW,
        spill_dir: str | Path | None = None,
    ):
        self._publish = publish
        self._online = online
        self.store = store
        self.num_classes, self.proxy_size = num_classes, proxy_size
        self.proxy_digest = proxy_digest
        self._weight_shapes = weight_shapes
        self.default_timeout_s = default_timeout_s
        self._on_state = on_state or (lambda *a, **k: None)
        self.max_devices = max_devices
        # deadlines per architecture from measured round times; progress tells slow from dead
        self.planner = planner
        self._progress_of = progress_of or (lambda _d: None)
        self.publish_window = publish_window
        # accepted tensors wait for aggregation in a file here (server_app.rounds.spill), not in
        # memory; None: in memory (float16 logits)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._lock = threading.Lock()
        self._collection: Collection | None = None
        self._abort = threading.Event()
        self._shutdown = False
        self.last_stats: dict[str, Any] = {}

    # ----------------------------------------------------------- Fleet API
    def devices(self) -> list[DeviceInfo]:
        """Online devices that can take part: a device whose status reports an empty data set
        (num_samples 0 with a label histogram: data born on the device, none yet) is left out, since
        it has nothing to train on and a result must count >= 1 sample (check_result); it is picked
        once its status says it holds data. A status without counts is taken as before."""
        devs = sorted((d for d in self._online() if d.num_samples > 0 or d.label_histogram is None),
                      key=lambda d: d.device_id)  # fmt: skip
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

    def run_round(self, assignments: list[Assignment], quorum: int, timeout_s: float | None) -> list[Result]:
        if not assignments:
            raise QuorumNotMet(-1, 0, max(quorum, 1))
        if not self._shutdown:
            self._abort.clear()
        round_id = assignments[0].round_id
        timeout = float(timeout_s if timeout_s is not None else self.default_timeout_s)
        now = time.time()
        hard_deadline = now + timeout  # the most this round waits, extensions included
        planned = min(timeout, self.planner.timeout_for(a.arch for a in assignments)) if self.planner else timeout
        deadline = now + planned
        shapes: dict[str, list[tuple[int, ...]] | None] = {}
        for a in assignments:
            if "weights" in a.plan.upload and a.weights is None and a.arch not in shapes:
                shapes[a.arch] = self._expected_weights(a)
        col = Collection(
            round_id=round_id,
            expect={a.device_id: Expectation.from_assignment(
                a, num_classes=self.num_classes, proxy_size=self.proxy_size, proxy_digest=self.proxy_digest,
                weight_shapes=shapes.get(a.arch)) for a in assignments},
            deadline=deadline,
        )  # fmt: skip
        if self.spill_dir is not None:
            col.spill = ResultSpill(self.spill_dir / f"r{round_id}.tensors")
        try:
            # A resumed round keeps what was accepted before the restart (the tensors are on disk).
            for res in self.store.accepted_results(round_id).values():
                col.keep(res)
                col.received_at[res.device_id] = time.time()
            if self.store.collection_closed(round_id):
                # Resumed after the collection closed (server died while aggregating): re-aggregate.
                if len(col.results) < quorum:
                    raise QuorumNotMet(round_id, len(col.results), quorum)
                return _held([col.results[d] for d in sorted(col.results)], col)
            with self._lock:
                self._collection = col
            try:
                return _held(self._run(col, assignments, quorum, deadline, hard_deadline), col)
            finally:
                with self._lock:
                    self._collection = None
        finally:
            if col.spill is not None:
                col.spill.close()  # attached already on success; discards the file otherwise

    # ------------------------------------------------------------ internals
    def _expected_weights(self, a: Assignment) -> list[tuple[int, ...]]:
        if a.weights is not None:
            return [tuple(np.shape(w)) for w in a.weights]
        if self._weight_shapes is None:
            raise ValueError("weights upload asked but the fleet cannot know the expected shapes")
        return self._weight_shapes(a.arch)

    def _extend(self, col: Collection, hard_deadline: float, window: float) -> bool:
        """At the deadline: move it on by `window` (at most to `hard_deadline`) if a missing participant
        reported progress for this round within the grace period (slow, not dead). True if moved."""
        now = time.time()
        if now >= hard_deadline or col.deadline >= hard_deadline:
            return False
        working = [d for d in sorted(col.participants - set(col.results)) if alive(self._progress_of(d), col.round_id, now)]
        if not working:
            return False
        col.deadline = min(hard_deadline, now + window)
        log.info("round deadline extended round=%d working=%s new_deadline_in_s=%.1f", col.round_id,
                 ",".join(working[:5]) + ("..." if len(working) > 5 else ""), col.deadline - now)
        self._on_state(col.round_id, "collecting", participants=sorted(col.participants), deadline=col.deadline)
        return True

    def _sync(self, col: Collection, index: SegmentIndex, final: bool = False) -> None:
        """Fold in results other processes (`koala serve --role ingest`) accepted into this round:
        the registry's accepted rows not in the collection, read from the shared payload store.
        `final` (after close_collection): take them even though the collection is closed."""
        try:
            rows = self.store.accepted_digests(col.round_id, -1 if final else len(col.results))
        except Exception:
            if final:
                raise
            log.warning("could not read accepted rows round=%d (retrying)", col.round_id, exc_info=True)
            return
        # an accepted row always carries its digest (the claim sets it); the column itself is nullable
        new = {d: dg for d, dg in (rows or {}).items() if d not in col.results and dg is not None}
        if not new:
            return
        found = index.load(new)
        now = time.time()
        with col.cond:
            for dev, res in found.items():
                col.keep(res)
                col.received_at.setdefault(dev, now)
                col.bytes_up.setdefault(dev, index.nbytes(new[dev]))
            col.cond.notify_all()
        for dev in sorted(set(new) - set(found)):
            log.error("accepted result not in the payload store round=%d device=%s", col.round_id, dev)
        log.debug("synced round=%d results_from_registry=%d", col.round_id, len(found))
        record("results_from_registry", len(found))

    def _observe(self, col: Collection) -> None:
        """Feed the planner this round's measured device round times (sent -> accepted), per arch."""
        if self.planner is None:
            return
        for dev in col.results:
            if dev in col.sent_at and dev in col.received_at and dev in col.expect:
                self.planner.observe(col.expect[dev].arch, col.received_at[dev] - col.sent_at[dev])

    def _run(self, col: Collection, assignments: list[Assignment], quorum: int, deadline: float,
             hard_deadline: float | None = None) -> list[Result]:  # fmt: skip
        hard_deadline = deadline if hard_deadline is None else hard_deadline
        window = max(1.0, deadline - time.time())
        t0 = time.perf_counter()
        # Headers per device, bodies once per distinct tensor set (the teacher logits are shared):
        # identical bytes to codec.encode_frame per device, without N float16 conversions + sha256.
        encoder = codec.FrameEncoder()
        parts: dict[str, tuple[bytes, bytes]] = {}
        for a in assignments:
            if a.device_id in col.results:
                continue  # resumed round: this device already delivered
            a.deadline, a.proxy_digest = deadline, self.proxy_digest
            parts[a.device_id] = encoder.parts(a)
        sizes = {dev: len(head) + len(body) for dev, (head, body) in parts.items()}
        t_encode = time.perf_counter() - t0
        self.store.save_collection(col)  # what ingestion workers judge this round's results by
        self.store.assignments_sent(col.round_id, sizes, deadline)
        index = self.store.segment_index(col.round_id)
        next_sync = time.monotonic() + SYNC_S
        for k, (dev, (head, body)) in enumerate(parts.items(), 1):
            col.sent_at[dev] = time.time()
            # Whole frames exist only while the MQTT client holds them (until PUBACK), not all round;
            # every `publish_window`-th one is waited for, so at most about that many (plus the
            # client's inflight window) are held at once, however large the fleet.
            if self.publish_window and k % self.publish_window == 0:
                self._publish(topics.device_assign(dev), head + body, 1, False, wait_s=PUBLISH_WAIT_S)
            else:
                self._publish(topics.device_assign(dev), head + body, 1, False)
        del parts
        record("bytes_down", sum(sizes.values()))
        self._on_state(col.round_id, "collecting", participants=sorted(col.participants), deadline=deadline)
        log.info("round dispatched round=%d devices=%d bytes_per_assign=%s deadline_in_s=%.1f", col.round_id,
                 len(sizes), _mean(list(sizes.values())), deadline - time.time())
        with col.cond:
            while not col.complete() and not self._abort.is_set():
                if time.monotonic() >= next_sync:
                    self._sync(col, index)
                    next_sync = time.monotonic() + SYNC_S
                    if col.complete():
                        break
                left = col.deadline - time.time()
                # extend just BEFORE the deadline, so the ingestor never judges a working device's
                # result `late` in the moment between expiry and the extension
                if left <= EXTEND_AHEAD_S and self._extend(col, hard_deadline, window):
                    continue
                if left <= 0:
                    break
                wait = min(SYNC_S, left - EXTEND_AHEAD_S if left > EXTEND_AHEAD_S else left)
                col.cond.wait(timeout=max(0.05, wait))
            col.closed = True
        if self._abort.is_set():
            raise RoundAborted(f"round {col.round_id} aborted by shutdown")
        self.store.close_collection(col.round_id, sorted(col.participants - set(col.results)))
        self._sync(col, index, final=True)  # the registry's accepted rows, now final, are the round's results
        self._observe(col)
        self._stats(col, sizes, t_encode, time.perf_counter() - t0)
        if len(col.results) < quorum:
            raise QuorumNotMet(col.round_id, len(col.results), quorum)
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


def _held(results: list[Result], col: Collection) -> list[Result]:
    """The round's results with their tensors: views of the round's spill file when it has one."""
    if col.spill is not None:
        col.spill.attach(results)
    return results


def _mean(xs: list[float] | list[int]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
