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
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError
from server_app.engine.types import DeviceInfo
from server_app.metrics_hook import record
from server_app.registry.errors import RegistryUnavailable

log = logging.getLogger("koala.ingest")
MAX_RESULTS_PER_ROUND = 8  # result messages one device may send per round (QoS 1 redeliveries included)


@dataclass(frozen=True)
class Outcome:
    status: str  # "accepted" | "duplicate" | "rejected" | "late" | "ignored"
    reason: str | None = None
    round_id: int | None = None
    device_id: str | None = None


# The writes one ingested batch makes, applied in order in one transaction by IngestStore.commit.
@dataclass(frozen=True)
class AcceptOp:
    """Claim the (round, device) row as accepted (atomic: not new = a racing worker took it)."""

    round_id: int
    device_id: str
    payload: bytes
    digest: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class MarkOp:
    """Decide a row `late` (records the submission) or `rejected` (reason only)."""

    round_id: int
    device_id: str
    status: str
    reason: str | None
    nbytes: int
    digest: str | None


@dataclass(frozen=True)
class RejectOp:
    """The audit event of a rejection."""

    device_id: str | None
    round_id: int | None
    reason: str
    detail: str


class IngestStore(Protocol):
    """Registry operations ingestion needs (implemented by server_app.rounds.orchestrator.RegistryStore)."""

    def submissions(self, keys: Iterable[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, str | None]]: ...
    def commit(self, ops: list[Any]) -> set[tuple[int, str]]: ...
    def device_status(self, status: cm.DeviceStatus) -> None: ...


class Presence:
    """Which devices are online, from their retained status (offline = Last Will or clean exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, cm.DeviceStatus] = {}
        self._seen: dict[str, float] = {}
        self._online = 0  # kept incrementally: a fleet coming online must not cost O(N) per status
        self.progress: dict[str, dict[str, Any]] = {}
        self.revoked: set[str] = set()  # registry-revoked devices: never online, their results refused

    def _counts(self, s: cm.DeviceStatus | None) -> bool:
        return s is not None and s.state == "online" and bool(s.arch) and s.device_id not in self.revoked

    def set_revoked(self, device_id: str, revoked: bool = True) -> None:
        """Take a device out of (or back into) every later round, whatever its status says."""
        with self._lock:
            was = self._counts(self._status.get(device_id))
            (self.revoked.add if revoked else self.revoked.discard)(device_id)
            self._online += int(self._counts(self._status.get(device_id))) - int(was)

    def sync_revoked(self, revoked: set[str]) -> None:
        """Make the revoked set the registry's (a revocation made through another server process)."""
        for dev in revoked - self.revoked:
            self.set_revoked(dev)
        for dev in self.revoked - revoked:
            self.set_revoked(dev, False)

    def update(self, status: cm.DeviceStatus) -> None:
        with self._lock:
            prev = self._status.get(status.device_id)
            self._online += int(self._counts(status)) - int(self._counts(prev))
            self._status[status.device_id] = status
            self._seen[status.device_id] = time.time()

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._online -= int(self._counts(self._status.pop(device_id, None)))

    def online_count(self) -> int:
        """Devices online with an architecture (= len(online()), in O(1))."""
        with self._lock:
            return self._online

    def online(self) -> list[DeviceInfo]:
        with self._lock:
            return [
                DeviceInfo(s.device_id, s.arch or "", s.num_samples or 0, s.label_histogram)  # _counts: arch set
                for s in self._status.values()
                if self._counts(s)
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
        refresh_collection: Callable[[], None] | None = None,
        status_sink: Callable[[cm.DeviceStatus], None] | None = None,
    ):
        self.store = store
        self.presence = presence
        self._collection = collection  # () -> MqttFleet.collection (the open Collection or None)
        # an ingestion worker's view of the open round lags the registry by up to a poll: when a
        # batch holds a result of another round than the view's, it is refreshed first
        self._refresh_collection = refresh_collection
        self.max_bytes = max_bytes
        # where device statuses go to the registry: a StatusWriter (coalesced, off the MQTT thread)
        # in the server; None writes each one at once (unit tests, tools)
        self.status_sink = status_sink
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # one batch decision at a time (idempotency check + write)
        self._attempts_lock = threading.Lock()
        self.max_results_per_round = max_results_per_round
        self._attempts: Counter[tuple[str | None, int | None]] = Counter()  # result messages per (device, round)

    # ------------------------------------------------------------- results
    def ingest_batch(self, items: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """Validate and persist a batch of result messages; one outcome per item, in order.

        Same rules as one message at a time (a later message of a device sees the decision on its
        earlier one in the batch), but one registry read of all (round, device) rows and one write
        (payloads: one fsync'd segment; rows and rejection events: one transaction). Raises only
        RegistryUnavailable, with nothing committed and nothing counted: retry the same batch."""
        if not items:
            return []
        t0 = time.perf_counter()
        try:
            outs = self._ingest(items)
        except RegistryUnavailable:
            raise
        except Exception as exc:  # a bug must not lose the batch: isolate the item that triggers it
            if len(items) > 1:
                log.exception("ingest bug in a batch of %d: retrying one by one", len(items))
                return [self.ingest_batch([it])[0] for it in items]
            topic, payload = items[0]
            log.exception("ingest bug topic=%s", topic)
            out, ops = self._rejection(_topic_device(topic), None, "bad_field", f"internal: {exc!r}", mark=False)
            try:
                self.store.commit(ops)
            except Exception:
                log.exception("could not record rejection topic=%s", topic)
            outs = [out]
        per_msg = (time.perf_counter() - t0) / len(items)
        for (_t, payload), out in zip(items, outs, strict=True):
            self.counts[out.status if out.status != "rejected" else f"rejected:{out.reason}"] += 1
            _metrics(out, len(payload), per_msg)
        return outs

    def _ingest(self, items: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        outs: list[Outcome | None] = [None] * len(items)
        ops: list[list[Any]] = [[] for _ in items]  # per message: its writes, committed in message order
        counted: list[tuple[str | None, int | None]] = []  # rate-limit counts to undo if the write fails
        decoded: list[tuple[int, cm.Result, str, bytes]] = []
        # phase 1, no registry: rate limit, decode (spoofing, frame checks), digest
        for i, (topic, raw) in enumerate(items):
            payload = bytes(raw)
            limited = self._over_limit(topic, payload, counted)
            if limited is not None:
                outs[i], ops[i] = limited
                continue
            try:
                _, msg = codec.decode_for_topic(topic, payload, max_bytes=self.max_bytes)
            except ContractError as exc:  # includes spoofed_device: payload id != topic id
                outs[i], ops[i] = self._rejection(_topic_device(topic), _frame_round(payload), exc.reason, exc.detail)
                continue
            assert isinstance(msg, cm.Result)
            decoded.append((i, msg, codec.frame_digest(payload), payload))
        try:
            with self._lock:  # one batch decision at a time (idempotency check + write)
                return self._decide_and_write(outs, ops, decoded)
        except BaseException:
            self._undo_attempts(counted)
            raise

    def _decide_and_write(self, outs: list[Outcome | None], ops: list[list[Any]],
                          decoded: list[tuple[int, cm.Result, str, bytes]]) -> list[Outcome]:
        # phase 2: one read of the batch's rows; decisions in memory, in arrival order
        state = self.store.submissions({(m.round_id, m.device_id) for _, m, _, _ in decoded})
        col = self._collection()
        if self._refresh_collection is not None and any(col is None or m.round_id != col.round_id for _, m, _, _ in decoded):
            self._refresh_collection()
            col = self._collection()
        accepts: list[tuple[int, cm.Result, str, int]] = []
        failed_checks = 0
        for i, msg, digest, payload in decoded:
            nbytes = len(payload)
            dev, rnd = msg.device_id, msg.round_id
            prior = state.get((rnd, dev))
            if dev in self.presence.revoked:
                outs[i], ops[i] = self._rejection(dev, rnd, "revoked_device", f"{dev} is revoked in the registry")
                continue
            if prior is None:
                reason = "wrong_round" if col is None or rnd != col.round_id else "unknown_device"
                outs[i], ops[i] = self._rejection(dev, rnd, reason, f"no assignment of round {rnd} to {dev}")
                continue
            status, prior_digest = prior
            if prior_digest == digest and status in ("accepted", "late"):
                log.debug("duplicate submission round=%d device=%s", rnd, dev)
                outs[i] = Outcome("duplicate", None, rnd, dev)
                continue
            if status in ("accepted", "late"):
                outs[i], ops[i] = self._rejection(dev, rnd, "duplicate", "a different submission for this round was "
                                                  "already taken", mark=False)  # fmt: skip
                continue
            if col is None or rnd != col.round_id or col.closed or col.expired():
                ops[i] = [MarkOp(rnd, dev, "late", "late", nbytes, digest)]
                state[(rnd, dev)] = ("late", digest)
                log.info("late submission round=%d device=%s", rnd, dev)
                outs[i] = Outcome("late", "late", rnd, dev)
                continue
            try:
                col.check(msg)  # the accept decision: the result must match what its device was assigned
            except ContractError as exc:
                failed_checks += 1
                outs[i], ops[i] = self._rejection(dev, rnd, exc.reason, exc.detail)
                state[(rnd, dev)] = ("rejected", prior_digest)
                continue
            ops[i] = [AcceptOp(rnd, dev, payload, digest, dict(msg.metrics))]
            state[(rnd, dev)] = ("accepted", digest)
            accepts.append((i, msg, digest, nbytes))
        # phase 3: one durable write for the whole batch
        writes = [op for per_msg in ops for op in per_msg]
        new = self.store.commit(writes) if writes else set()
        if col is not None:
            col.rejected += failed_checks
        lost = [(i, msg, digest, nbytes) for i, msg, digest, nbytes in accepts if (msg.round_id, msg.device_id) not in new]
        if lost:  # not claimed: another ingestion worker took the row first, or the round closed meanwhile
            self._unclaimed(outs, lost)
        for i, msg, _digest, nbytes in accepts:
            dev, rnd = msg.device_id, msg.round_id
            if (rnd, dev) not in new:
                continue
            if col is not None:
                col.received += 1
                # False: closed between the check and now. The claim committed before the round
                # closed in the registry, so the orchestrator's final read of the accepted rows
                # still takes it (server_app.rounds.fleet._sync): it stays accepted.
                col.add(msg, nbytes)
            log.info("accepted round=%d device=%s bytes=%d", rnd, dev, nbytes)
            outs[i] = Outcome("accepted", None, rnd, dev)
        assert all(o is not None for o in outs)
        return [o for o in outs if o is not None]

    def _unclaimed(self, outs: list[Outcome | None], lost: list[tuple[int, cm.Result, str, int]]) -> None:
        """Outcomes of valid results whose claim failed: `duplicate` when the row holds an accepted
        (or late) submission — a racing worker took this device's result — else `late`: the round
        closed in the registry between our check and our write (recorded as such)."""
        try:
            state = self.store.submissions({(m.round_id, m.device_id) for _, m, _, _ in lost})
        except Exception:
            log.exception("could not re-read %d unclaimed results", len(lost))
            state = {}
        late: list[Any] = []
        for i, msg, digest, nbytes in lost:
            dev, rnd = msg.device_id, msg.round_id
            status = state.get((rnd, dev), ("?", None))[0]
            if status in ("accepted", "late"):
                outs[i] = Outcome("duplicate", None, rnd, dev)
                continue
            late.append(MarkOp(rnd, dev, "late", "late", nbytes, digest))
            log.info("late submission round=%d device=%s (round closed while ingesting)", rnd, dev)
            outs[i] = Outcome("late", "late", rnd, dev)
        if late:
            try:
                self.store.commit(late)
            except Exception:
                log.exception("could not mark %d results late", len(late))

    def _over_limit(self, topic: str, payload: bytes,
                    counted: list[tuple[str | None, int | None]]) -> tuple[Outcome, list[Any]] | None:
        """Per-device limit on result messages per round: a device (even an authenticated one,
        which the ACL lets publish on its own topic) cannot flood the registry with rejections.
        The first message over the limit is recorded; the rest are only counted."""
        dev, rnd = _topic_device(topic), _frame_round(payload)
        with self._attempts_lock:
            if len(self._attempts) > 100_000:  # bounded memory under a flood of bogus round ids
                self._attempts.clear()
            self._attempts[(dev, rnd)] += 1
            n = self._attempts[(dev, rnd)]
        counted.append((dev, rnd))
        if n <= self.max_results_per_round:
            return None
        if n == self.max_results_per_round + 1:
            return self._rejection(dev, rnd, "rate_limited", f"more than {self.max_results_per_round} result "
                                   f"messages for this round", mark=False)  # fmt: skip
        return Outcome("rejected", "rate_limited", rnd, dev), []

    def _undo_attempts(self, counted: list[tuple[str | None, int | None]]) -> None:
        """A batch that will be retried must not count twice against the rate limit."""
        with self._attempts_lock:
            for key in counted:
                if self._attempts.get(key, 0) > 0:
                    self._attempts[key] -= 1

    def _rejection(self, dev: str | None, rnd: int | None, reason: str, detail: str,
                   mark: bool = True) -> tuple[Outcome, list[Any]]:
        """The outcome of a rejection and its writes (audit event; the row marked `rejected`)."""
        log.warning("rejected device=%s round=%s reason=%s detail=%s", dev, rnd, reason, detail[:200])
        ops: list[Any] = [RejectOp(dev, rnd, reason, detail)]
        if mark and dev is not None and rnd is not None and reason not in ("spoofed_device",):
            ops.append(MarkOp(rnd, dev, "rejected", reason, 0, None))
        return Outcome("rejected", reason, rnd, dev), ops

    def _reject(self, dev: str | None, rnd: int | None, reason: str, detail: str, mark: bool = True) -> Outcome:
        """Record a rejection now (status messages); a registry outage only loses the audit record."""
        out, ops = self._rejection(dev, rnd, reason, detail, mark)
        try:
            self.store.commit(ops)
        except Exception:  # the registry being down must not crash ingestion either
            log.exception("could not record rejection device=%s round=%s", dev, rnd)
        return out

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
        record("device_online", self.presence.online_count())
        if self.status_sink is not None:
            self.status_sink(msg)
        else:
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
            # progress is advisory and frequent: counted and logged (not written to the registry per
            # message, which a flooding device could turn into database load); results still are
            key = f"progress_dropped:{exc.reason}"
            self.counts[key] += 1
            n = self.counts[key]
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a flood cannot flood the log
                log.warning("progress dropped topic=%s reason=%s detail=%s (%d so far)", topic, exc.reason, exc.detail, n)
            return Outcome("ignored", exc.reason)
        assert isinstance(msg, cm.Progress)
        self.presence.progress[msg.device_id] = {"round_id": msg.round_id, "phase": msg.phase, "step": msg.step,
                                                 "total": msg.total, "loss": msg.loss, "at": time.time()}
        return Outcome("accepted", None, msg.round_id, msg.device_id)


def _metrics(out: Outcome, nbytes: int, seconds: float) -> None:
    """Prometheus counters of one handled result (metrics_hook: they never break ingestion)."""
    if out.status == "accepted":
        record("submission_accepted", nbytes)
    elif out.status == "rejected":
        record("submission_rejected", out.reason or "other", nbytes)
    else:
        record("bytes_up", nbytes)
    record("observe_ingest", seconds)


def _topic_device(topic: str) -> str | None:
    try:
        return topics.parse_topic(topic).device_id
    except ContractError:
        return None


def _frame_round(payload: bytes) -> int | None:
    """Best-effort round id of a frame (for the rate limit and audit records only): reads the header
    without hashing the body — decoding checks the body once, later."""
    header = codec.peek_header(payload)
    r = None if header is None else header.get("round_id")
    return r if isinstance(r, int) and not isinstance(r, bool) else None
