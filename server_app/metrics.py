"""Prometheus metrics of the KOALA server: every metric is defined here and nowhere else.

Why one module with tiny functions: the orchestrator, the ingestion path and the API must not know
prometheus-client idioms or metric names; they call e.g. ``metrics.submission_accepted(nbytes)``
and the names stay consistent with the Grafana dashboard (``dashboards/grafana/koala.json``, whose
queries a test checks against ``/metrics``).

Why a private ``CollectorRegistry`` (``REGISTRY``) instead of prometheus-client's global one:
importing this module twice (tests, reloads) or embedding the server in another process that
uses the default registry cannot raise "Duplicated timeseries". Counters are process-wide (one
server process = one set of counters, like any Prometheus target); tests assert deltas, never
absolute values.

State that lives in the database (devices online, rounds by state, the latest round's accuracy and
KD loss) is *refreshed from the registry at scrape time* (``refresh_from_registry``), so the
gauges are right after a restart and with several server workers. Event-like quantities
(submissions, bytes, latencies, phase durations) are counted where they happen.

API for callers (all cheap, thread-safe, never raise on odd input):

    submission_accepted(nbytes)            a device result was folded into its round
    submission_rejected(reason, nbytes=0)  refused message; reason = ContractError.reason
    observe_ingest(seconds)                receive -> decision latency of one result
    observe_phase(phase, seconds)          duration of a round phase (configure/collect/aggregate/...)
    bytes_down(nbytes) / bytes_up(nbytes)  payload bytes server->devices / devices->server
    results_from_registry(n)               results other processes accepted, taken by the orchestrator
    ingest_backpressure()                  the MQTT handler waited for a full ingest queue
    round_finished(state)                  a round reached a terminal state
    round_metrics(large_acc=, small_acc=, kd_loss=, round_id=)   latest model quality
    device_online(n) / rounds_by_state({...})   gauges (normally set by refresh_from_registry)
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.metrics_core import Metric

from device_firmware_py.contract.errors import REASONS
from device_firmware_py.contract.messages import DEVICE_STATES, ROUND_STATES

__all__ = [
    "CONTENT_TYPE_LATEST",
    "REGISTRY",
    "METRIC_NAMES",
    "bytes_down",
    "bytes_up",
    "results_from_registry",
    "device_online",
    "observe_ingest",
    "observe_phase",
    "refresh_from_registry",
    "render",
    "round_finished",
    "round_metrics",
    "rounds_by_state",
    "submission_accepted",
    "submission_rejected",
]

disable_created_metrics()  # *_created series double the output and no dashboard uses them
REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

# Round phases the orchestrator reports. Unknown phases are folded into "other" (bounded labels).
PHASES = ("configure", "dispatch", "collect", "aggregate", "fuse", "distill", "evaluate", "persist", "total", "other")
_LABEL_RE = re.compile(r"[^a-z0-9_]")

DEVICES_ONLINE = Gauge("koala_devices_online", "Devices whose last status is online.", registry=REGISTRY)
DEVICES = Gauge("koala_devices", "Registered (not revoked) devices by last status.", ["status"], registry=REGISTRY)
ROUNDS = Gauge("koala_rounds", "Rounds in the registry by state.", ["state"], registry=REGISTRY)
CURRENT_ROUND = Gauge("koala_current_round", "Id of the newest round (0 when none).", registry=REGISTRY)
ROUNDS_FINISHED = Counter(
    "koala_rounds_finished", "Rounds that reached a terminal state in this process.", ["state"], registry=REGISTRY
)
SUBMISSIONS_ACCEPTED = Counter(
    "koala_submissions_accepted", "Device results accepted into a round.", registry=REGISTRY
)
SUBMISSIONS_REJECTED = Counter(
    "koala_submissions_rejected", "Device messages refused, by contract reason.", ["reason"], registry=REGISTRY
)
INGEST_LATENCY = Histogram(
    "koala_ingest_latency_seconds",
    "Time from receiving a device result to the accept/reject decision.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
PHASE_SECONDS = Histogram(
    "koala_round_phase_seconds",
    "Duration of round phases.",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
KD_LOSS = Gauge("koala_kd_loss", "Reverse-KD loss of the large model in the latest round.", registry=REGISTRY)
LARGE_ACC = Gauge("koala_large_model_accuracy", "Test accuracy of the large model after the latest round.", registry=REGISTRY)
SMALL_ACC = Gauge("koala_small_model_accuracy", "Mean small-model accuracy reported in the latest round.", registry=REGISTRY)
METRICS_ROUND = Gauge("koala_model_metrics_round", "Round id the model-quality gauges belong to.", registry=REGISTRY)
BYTES_UP = Counter("koala_bytes_up", "Payload bytes received from devices.", registry=REGISTRY)
BYTES_DOWN = Counter("koala_bytes_down", "Payload bytes sent to devices.", registry=REGISTRY)
RESULTS_FROM_REGISTRY = Counter(
    "koala_results_from_registry", "Results the orchestrator took from the registry that other processes "
    "(`--role ingest` workers) accepted.", registry=REGISTRY)  # fmt: skip
INGEST_BACKPRESSURE = Counter(
    "koala_ingest_backpressure", "Times the MQTT handler waited for the ingest worker (its queue of results reached "
    "max_backlog): the broker delivered faster than results are ingested.", registry=REGISTRY)  # fmt: skip

INTAKE_STALLED = Gauge(
    "koala_intake_stalled", "1 while the intake watchdog finds the broker delivering nothing to this server "
    "(server_app.intake_watchdog); it reconnects and the gauge returns to 0 when a probe arrives.",
    registry=REGISTRY)  # fmt: skip

DEVICES_QUARANTINED = Counter(
    "koala_devices_quarantined", "Flooding devices whose account the server disabled at the broker for a while "
    "(server_app.quarantine).", registry=REGISTRY)  # fmt: skip

# Names as exposed on /metrics (counters get _total, histograms _bucket/_sum/_count).
METRIC_NAMES: frozenset[str] = frozenset(
    {
        "koala_devices_online",
        "koala_devices",
        "koala_rounds",
        "koala_current_round",
        "koala_rounds_finished_total",
        "koala_submissions_accepted_total",
        "koala_submissions_rejected_total",
        "koala_ingest_latency_seconds_bucket",
        "koala_ingest_latency_seconds_sum",
        "koala_ingest_latency_seconds_count",
        "koala_round_phase_seconds_bucket",
        "koala_round_phase_seconds_sum",
        "koala_round_phase_seconds_count",
        "koala_kd_loss",
        "koala_large_model_accuracy",
        "koala_small_model_accuracy",
        "koala_model_metrics_round",
        "koala_bytes_up_total",
        "koala_bytes_down_total",
        "koala_results_from_registry_total",
        "koala_ingest_backpressure_total",
        "koala_intake_stalled",
        "koala_devices_quarantined_total",
    }
)
# Exported only by servers that ingest (ServerServices with an Ingestor), see render().
INGEST_METRIC_NAMES: frozenset[str] = frozenset({"koala_ingest_outcomes_total", "koala_ingest_dropped_by_kind_total",
                                                 "koala_intake_stalls_total", "koala_intake_recoveries_total"})

# Pre-create the label sets so dashboards show 0 instead of "no data" before the first event.
for _reason in sorted(REASONS):
    SUBMISSIONS_REJECTED.labels(reason=_reason)
for _state in ROUND_STATES:
    ROUNDS.labels(state=_state)
for _state in DEVICE_STATES + ("unknown",):
    DEVICES.labels(status=_state)
for _phase in PHASES:
    PHASE_SECONDS.labels(phase=_phase)

_refresh_lock = threading.Lock()


def _label(value: object, allowed: frozenset[str] | tuple[str, ...], fallback: str) -> str:
    text = _LABEL_RE.sub("_", str(value).lower())[:64]
    return text if text in allowed else fallback


def _nonneg(n: object) -> float:
    try:
        v = float(n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def _finite(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


# ---- event API (called by ingestion and the orchestrator) --------------------------------------------
def submission_accepted(nbytes: int = 0) -> None:
    """A device result was accepted; ``nbytes`` is its payload size (also counted as bytes up)."""
    SUBMISSIONS_ACCEPTED.inc()
    BYTES_UP.inc(_nonneg(nbytes))


def submission_rejected(reason: str, nbytes: int = 0) -> None:
    """A device message was refused. Reasons outside the contract's set are counted as ``other``
    so a bug can never explode the label cardinality."""
    SUBMISSIONS_REJECTED.labels(reason=_label(reason, REASONS, "other")).inc()
    BYTES_UP.inc(_nonneg(nbytes))


def observe_ingest(seconds: float) -> None:
    """Latency of one result from receipt to decision (decode, checks, DB write)."""
    s = _nonneg(seconds)
    INGEST_LATENCY.observe(s)


def observe_phase(phase: str, seconds: float) -> None:
    """Duration of a round phase; phases: ``PHASES`` (anything else is ``other``)."""
    PHASE_SECONDS.labels(phase=_label(phase, PHASES, "other")).observe(_nonneg(seconds))


def bytes_down(nbytes: int) -> None:
    """Assignment payload bytes published to devices."""
    BYTES_DOWN.inc(_nonneg(nbytes))


def bytes_up(nbytes: int) -> None:
    """Device payload bytes not already counted by submission_accepted/rejected."""
    BYTES_UP.inc(_nonneg(nbytes))


def results_from_registry(n: int) -> None:
    RESULTS_FROM_REGISTRY.inc(_nonneg(n))


def device_quarantined() -> None:
    DEVICES_QUARANTINED.inc()


def intake_stalled(flag: bool) -> None:
    INTAKE_STALLED.set(1 if flag else 0)


def ingest_backpressure() -> None:
    INGEST_BACKPRESSURE.inc()


def round_finished(state: str) -> None:
    """A round reached a terminal state (completed / failed / aborted)."""
    ROUNDS_FINISHED.labels(state=_label(state, ROUND_STATES, "failed")).inc()


def round_metrics(
    *,
    large_acc: float | None = None,
    small_acc: float | None = None,
    kd_loss: float | None = None,
    round_id: int | None = None,
) -> None:
    """Latest model quality. Non-finite or missing values leave the gauge unchanged."""
    for gauge, value in ((LARGE_ACC, large_acc), (SMALL_ACC, small_acc), (KD_LOSS, kd_loss), (METRICS_ROUND, round_id)):
        v = _finite(value)
        if v is not None:
            gauge.set(v)


def device_online(n: int) -> None:
    DEVICES_ONLINE.set(_nonneg(n))


def rounds_by_state(counts: Mapping[str, int]) -> None:
    for state in ROUND_STATES:
        ROUNDS.labels(state=state).set(_nonneg(counts.get(state, 0)))


# ---- scrape-time refresh from the registry ---------------------------------------------------------
# Names under which the orchestrator stores round metrics (Round.metrics JSON / metrics table).
# First match wins; the engine writes large_test_acc / small_test_acc_mean / rkd_loss.
LARGE_ACC_KEYS = ("large_test_acc", "large_acc", "large_accuracy")
SMALL_ACC_KEYS = ("small_test_acc_mean", "global_small_test_acc", "small_acc", "local_acc")
KD_LOSS_KEYS = ("rkd_loss", "kd_loss", "distill_loss")
BYTES_UP_KEYS = ("bytes_up_total",)
BYTES_DOWN_KEYS = ("bytes_down_total",)


def pick(values: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """First finite number among ``keys`` in a metrics mapping (tolerates naming variants)."""
    for k in keys:
        v = _finite(values.get(k))
        if v is not None:
            return v
    return None


def refresh_from_registry(session: Any) -> None:
    """Set the DB-derived gauges from one SQLAlchemy session (called by the /metrics route)."""
    from sqlalchemy import func, select

    from server_app.registry.models import Device, Round

    with _refresh_lock:
        dev_rows = session.execute(
            select(Device.status, func.count()).where(Device.revoked.is_(False)).group_by(Device.status)
        ).all()
        by_status = {str(s): int(n) for s, n in dev_rows}
        for status in DEVICE_STATES + ("unknown",):
            DEVICES.labels(status=status).set(by_status.get(status, 0))
        device_online(by_status.get("online", 0))
        round_rows = session.execute(select(Round.state, func.count()).group_by(Round.state)).all()
        rounds_by_state({str(s): int(n) for s, n in round_rows})
        newest = session.scalars(select(Round).order_by(Round.id.desc()).limit(1)).first()
        CURRENT_ROUND.set(newest.id if newest is not None else 0)
        done = session.scalars(
            select(Round).where(Round.state == "completed").order_by(Round.id.desc()).limit(1)
        ).first()
        if done is not None and done.metrics:
            round_metrics(
                large_acc=pick(done.metrics, LARGE_ACC_KEYS),
                small_acc=pick(done.metrics, SMALL_ACC_KEYS),
                kd_loss=pick(done.metrics, KD_LOSS_KEYS),
                round_id=done.id,
            )


INGEST_OUTCOMES = "koala_ingest_outcomes"
_OUTCOMES = ("accepted", "duplicate", "late", "rejected", "ignored")


class _IngestOutcomes:
    """Exports an Ingestor's own outcome counter (``Ingestor.counts``: "accepted", "duplicate", "late",
    "rejected:<reason>") as ``koala_ingest_outcomes_total{outcome, reason}``.

    Why a bridge and not calls inside ingestion: it needs no change to the ingestion code and reads
    the very numbers ingestion decides on. Built per scrape from the scraped app's own services, so
    two apps in one process (tests) never mix their counts.
    """

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = dict(counts)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(
            INGEST_OUTCOMES, "Device results by ingestion outcome (this server process).", labels=["outcome", "reason"]
        )
        totals: dict[tuple[str, str], float] = {(o, ""): 0.0 for o in ("accepted", "duplicate", "late")}
        for key, n in self.counts.items():
            outcome, _, reason = str(key).partition(":")
            outcome = _label(outcome, _OUTCOMES, "ignored")
            reason = _label(reason, REASONS, "other") if reason else ""
            totals[(outcome, reason)] = totals.get((outcome, reason), 0.0) + _nonneg(n)
        for (outcome, reason), v in sorted(totals.items()):
            fam.add_metric([outcome, reason], v)
        yield fam


class _IntakeGuards:
    """Per scrape, like _IngestOutcomes: messages the per-device budget dropped before decoding
    (``koala_ingest_dropped_total{kind, device}``: a label set exists only for a device that went over
    its budget) and the intake watchdog's stalls and recoveries."""

    def __init__(self, dropped: Mapping[tuple[str, str], int], stalls: int, recoveries: int) -> None:
        self.dropped, self.stalls, self.recoveries = dict(dropped), stalls, recoveries

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily("koala_ingest_dropped", "Device messages dropped over the device's budget, "
                                  "before decoding (server_app.ingest_budget).", labels=["kind", "device"])  # fmt: skip
        kinds = {"result": 0.0, "progress": 0.0, "status": 0.0}
        for (kind, dev), n in sorted(self.dropped.items()):
            k = _LABEL_RE.sub("_", str(kind))[:16]
            fam.add_metric([k, str(dev)[:128]], _nonneg(n))
            kinds[k] = kinds.get(k, 0.0) + _nonneg(n)
        yield fam
        by_kind = CounterMetricFamily("koala_ingest_dropped_by_kind", "The same, summed over devices (always "
                                      "exported, 0 before any drop).", labels=["kind"])  # fmt: skip
        for k, n in sorted(kinds.items()):
            by_kind.add_metric([k], n)
        yield by_kind
        yield CounterMetricFamily("koala_intake_stalls", "Intake stalls the watchdog detected and cured by reconnecting.",
                                  value=_nonneg(self.stalls))  # fmt: skip
        yield CounterMetricFamily("koala_intake_recoveries", "Stalls after which the broker delivered again.",
                                  value=_nonneg(self.recoveries))  # fmt: skip


def render(ingest_counts: Mapping[str, int] | None = None, dropped: Mapping[tuple[str, str], int] | None = None,
           stalls: int = 0, recoveries: int = 0) -> bytes:  # fmt: skip
    """The text exposition of every metric (what /metrics returns), plus the scraped server's
    ingestion outcomes, budget drops and watchdog counts when it has an Ingestor."""
    text = generate_latest(REGISTRY)
    if ingest_counts is not None:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_IngestOutcomes(ingest_counts))  # type: ignore[arg-type]
        extra.register(_IntakeGuards(dropped or {}, stalls, recoveries))  # type: ignore[arg-type]
        text += generate_latest(extra)
    return text
