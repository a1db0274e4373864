"""Validated ingestion of what devices publish: results, status (presence) and progress.

Why a module of its own: this is the server's attack surface. Every message is decoded by the
contract codec, checked against the round being collected (round id, participant, shapes, proxy
digest, NaN/Inf), written idempotently to the registry and only then handed to the round.
Anything wrong becomes a recorded rejection with a stable reason (ContractError.reason) — never
an exception escaping into the MQTT network thread, never a tensor folded into the large model.

Outcomes of a result message (returned, and counted in `Ingestor.counts`):
  accepted   first valid submission of a participant while its round collects
  duplicate  the same bytes again (QoS 1 redelivery, device re-publish): counted once, no-op
  rejected   (reason) bad frame, spoofed device id, wrong round, not a participant, bad shape,
             a second *different* submission, ...
  late       a participant's valid result after its round closed: recorded, not folded in
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from device_firmware_py.contract import codec, engine_map, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError
from server_app.engine.types import DeviceInfo, DeviceResult
from server_app.registry.errors import RegistryUnavailable

log = logging.getLogger("koala.ingest")
MAX_RESULTS_PER_ROUND = 8  # result messages one device may send per round (QoS 1 redeliveries included)
MAX_DEFERRED = 10_000  # results held in memory while the registry is unreachable


@dataclass(frozen=True)
class Outcome:
    status: str  # "accepted" | "duplicate" | "rejected" | "late" | "ignored" | "deferred" (registry down: retried)
    reason: str | None = None
    round_id: int | None = None
    device_id: str | None = None


class IngestStore(Protocol):
    """Registry operations ingestion needs (implemented by server_app.orchestrator.RegistryStore)."""

    def submission(self, round_id: int, device_id: str) -> tuple[str, str | None] | None: ...
    def accept(self, round_id: int, device_id: str, payload: bytes, digest: str, metrics: dict[str, Any]) -> bool: ...
    def mark(self, round_id: int, device_id: str, status: str, reason: str | None, nbytes: int, digest: str | None) -> None: ...
    def reject_event(self, device_id: str | None, round_id: int | None, reason: str, detail: str) -> None: ...
    def device_status(self, status: cm.DeviceStatus) -> None: ...


class Presence:
    """Which devices are online, from their retained status (offline = Last Will or clean exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, cm.DeviceStatus] = {}
        self._seen: dict[str, float] = {}
        self.progress: dict[str, dict[str, Any]] = {}

    def update(self, status: cm.DeviceStatus) -> None:
        with self._lock:
            self._status[status.device_id] = status
            self._seen[status.device_id] = time.time()

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._status.pop(device_id, None)

    def online(self) -> list[DeviceInfo]:
        with self._lock:
            return [
                DeviceInfo(**engine_map.device_info_fields(s))
                for s in self._status.values()
                if s.state == "online" and s.arch
            ]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                d: {"state": s.state, "arch": s.arch, "num_samples": s.num_samples, "last_seen": self._seen.get(d),
                    "progress": self.progress.get(d)}
                for d, s in self._status.items()
            }  # fmt: skip


class Ingestor:
    """Handlers for the server's subscriptions. Thread-safe; never raises."""

    def __init__(
        self,
        store: IngestStore,
        presence: Presence,
        collection: Callable[[], Any],
        *,
        max_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES,
        max_results_per_round: int = MAX_RESULTS_PER_ROUND,
    ):
        self.store = store
        self.presence = presence
        self._collection = collection  # () -> MqttFleet.collection (the open Collection or None)
        self.max_bytes = max_bytes
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # one submission decision at a time (idempotency check + write)
        self.max_results_per_round = max_results_per_round
        self._attempts: Counter[tuple[str | None, int | None]] = Counter()  # result messages per (device, round)
        self._pending: deque[tuple[str, bytes]] = deque()  # results parked while the registry is down
        self._pending_lock = threading.Lock()
        self._retry_thread: threading.Thread | None = None

    # ------------------------------------------------------------- results
    def on_result(self, topic: str, payload: bytes) -> Outcome:
        t0 = time.perf_counter()
        try:
            limited = self._over_limit(topic, bytes(payload))
            out = limited or self._result(topic, bytes(payload))
        except RegistryUnavailable as exc:
            # The broker already has our PUBACK: dropping the message here would lose the result
            # for good. Park it and retry off the network thread until the database is back.
            self._defer(topic, bytes(payload), exc)
            out = Outcome("deferred")
        except Exception as exc:  # a bug here must not kill the MQTT thread: record and go on
            log.exception("ingest bug topic=%s", topic)
            out = self._reject(_topic_device(topic), None, "bad_field", f"internal: {exc!r}")
        self.counts[out.status if out.status != "rejected" else f"rejected:{out.reason}"] += 1
        _metrics(out, len(payload), time.perf_counter() - t0)
        return out

    def _over_limit(self, topic: str, payload: bytes) -> Outcome | None:
        """Per-device limit on result messages per round: a device (even an authenticated one,
        which the ACL lets publish on its own topic) cannot flood the registry with rejections.
        The first message over the limit is recorded; the rest are only counted."""
        dev, rnd = _topic_device(topic), _frame_round(payload)
        with self._lock:
            if len(self._attempts) > 100_000:  # bounded memory under a flood of bogus round ids
                self._attempts.clear()
            self._attempts[(dev, rnd)] += 1
            n = self._attempts[(dev, rnd)]
        if n <= self.max_results_per_round:
            return None
        if n == self.max_results_per_round + 1:
            return self._reject(dev, rnd, "rate_limited", f"more than {self.max_results_per_round} result messages "
                                f"for this round", mark=False)  # fmt: skip
        return Outcome("rejected", "rate_limited", rnd, dev)

    def _defer(self, topic: str, payload: bytes, exc: Exception) -> None:
        """Queue a result the registry could not take; one daemon thread re-ingests the queue."""
        with self._pending_lock:
            if len(self._pending) >= MAX_DEFERRED:
                dropped = self._pending.popleft()
                log.error("deferred queue full, dropping oldest result topic=%s", dropped[0])
            self._pending.append((topic, payload))
            if self._retry_thread is None or not self._retry_thread.is_alive():
                self._retry_thread = threading.Thread(target=self._retry_deferred, name="ingest-retry", daemon=True)
                self._retry_thread.start()
        log.warning("registry unavailable, result deferred topic=%s pending=%d error=%s", topic, len(self._pending), exc)

    def _retry_deferred(self) -> None:
        delay = 0.5
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                topic, payload = self._pending[0]
            try:
                out = self._result(topic, payload)
            except RegistryUnavailable:
                time.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            except Exception as exc:
                log.exception("ingest bug (deferred) topic=%s", topic)
                out = self._reject(_topic_device(topic), None, "bad_field", f"internal: {exc!r}")
            delay = 0.5
            with self._pending_lock:
                self._pending.popleft()
            self.counts[out.status if out.status != "rejected" else f"rejected:{out.reason}"] += 1
            log.info("deferred result ingested topic=%s status=%s", topic, out.status)

    def _result(self, topic: str, payload: bytes) -> Outcome:
        nbytes = len(payload)
        try:
            _, msg = codec.decode_for_topic(topic, payload, max_bytes=self.max_bytes)
        except ContractError as exc:  # includes spoofed_device: payload id != topic id
            return self._reject(_topic_device(topic), _frame_round(payload), exc.reason, exc.detail)
        assert isinstance(msg, cm.Result)
        dev, rnd = msg.device_id, msg.round_id
        digest = codec.payload_digest(payload)
        col = self._collection()
        with self._lock:
            prior = self.store.submission(rnd, dev)  # (status, digest) of the (round, device) row
            if prior is None:
                reason = "wrong_round" if col is None or rnd != col.round_id else "unknown_device"
                return self._reject(dev, rnd, reason, f"no assignment of round {rnd} to {dev}")
            status, prior_digest = prior
            if prior_digest == digest and status in ("accepted", "late"):
                log.debug("duplicate submission round=%d device=%s", rnd, dev)
                return Outcome("duplicate", None, rnd, dev)
            if status in ("accepted", "late"):
                return self._reject(dev, rnd, "duplicate", "a different submission for this round was already taken",
                                    mark=False)
            if col is None or rnd != col.round_id or col.closed or col.expired():
                self.store.mark(rnd, dev, "late", "late", nbytes, digest)
                log.info("late submission round=%d device=%s", rnd, dev)
                return Outcome("late", "late", rnd, dev)
            try:
                codec.check_result(
                    msg, round_id=col.round_id, participants=col.participants, logits_shape=col.logits_shape,
                    proxy_digest=col.proxy_digest,
                    weight_shapes=None if col.weight_shapes is None else col.weight_shapes.get(msg.arch),
                )  # fmt: skip
            except ContractError as exc:
                col.rejected += 1
                return self._reject(dev, rnd, exc.reason, exc.detail)
            result: DeviceResult = engine_map.result_to_engine(msg)
            if not self.store.accept(rnd, dev, payload, digest, dict(msg.metrics)):
                return Outcome("duplicate", None, rnd, dev)
            col.received += 1
            if not col.add(result, nbytes):  # closed between the check and now
                self.store.mark(rnd, dev, "late", "late", nbytes, digest)
                return Outcome("late", "late", rnd, dev)
        log.info("accepted round=%d device=%s bytes=%d", rnd, dev, nbytes)
        return Outcome("accepted", None, rnd, dev)

    def _reject(self, dev: str | None, rnd: int | None, reason: str, detail: str, mark: bool = True) -> Outcome:
        log.warning("rejected device=%s round=%s reason=%s detail=%s", dev, rnd, reason, detail[:200])
        try:
            self.store.reject_event(dev, rnd, reason, detail)
            if mark and dev is not None and rnd is not None and reason not in ("spoofed_device",):
                self.store.mark(rnd, dev, "rejected", reason, 0, None)
        except Exception:  # the registry being down must not crash ingestion either
            log.exception("could not record rejection device=%s round=%s", dev, rnd)
        return Outcome("rejected", reason, rnd, dev)

    # -------------------------------------------------------------- status
    def on_status(self, topic: str, payload: bytes) -> Outcome:
        if not payload:  # retained message cleared
            dev = _topic_device(topic)
            if dev:
                self.presence.forget(dev)
            return Outcome("ignored")
        try:
            _, msg = codec.decode_for_topic(topic, bytes(payload))
        except ContractError as exc:
            return self._reject(_topic_device(topic), None, exc.reason, exc.detail, mark=False)
        assert isinstance(msg, cm.DeviceStatus)
        self.presence.update(msg)
        try:
            from server_app import metrics

            metrics.device_online(len(self.presence.online()))
        except ImportError:
            pass
        try:
            self.store.device_status(msg)
        except Exception:
            log.exception("could not record device status device=%s", msg.device_id)
        log.info("device status device=%s state=%s arch=%s samples=%s", msg.device_id, msg.state, msg.arch, msg.num_samples)
        return Outcome("accepted", None, None, msg.device_id)

    def on_progress(self, topic: str, payload: bytes) -> Outcome:
        try:
            _, msg = codec.decode_for_topic(topic, bytes(payload))
        except ContractError as exc:
            log.debug("progress dropped topic=%s reason=%s", topic, exc.reason)
            return Outcome("ignored", exc.reason)
        assert isinstance(msg, cm.Progress)
        self.presence.progress[msg.device_id] = {"round_id": msg.round_id, "phase": msg.phase, "step": msg.step,
                                                 "total": msg.total, "loss": msg.loss}
        return Outcome("accepted", None, msg.round_id, msg.device_id)


def _metrics(out: Outcome, nbytes: int, seconds: float) -> None:
    """Prometheus counters (server-only module; absent metrics never break ingestion)."""
    try:
        from server_app import metrics
    except ImportError:
        return
    if out.status == "accepted":
        metrics.submission_accepted(nbytes)
    elif out.status == "rejected":
        metrics.submission_rejected(out.reason or "other", nbytes)
    else:
        metrics.bytes_up(nbytes)
    metrics.observe_ingest(seconds)


def _topic_device(topic: str) -> str | None:
    try:
        return topics.parse_topic(topic).device_id
    except ContractError:
        return None


def _frame_round(payload: bytes) -> int | None:
    """Best-effort round id of a frame that failed validation (for the audit record only)."""
    try:
        _, header, _ = codec.read_frame_header(payload)
        r = header.get("round_id")
        return r if isinstance(r, int) and not isinstance(r, bool) else None
    except (ContractError, Exception):
        return None
