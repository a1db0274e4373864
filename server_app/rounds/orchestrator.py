"""RoundOrchestrator: runs KOALA rounds against real devices, resumable from the registry.

It drives the engine's `Strategy` through `MqttFleet` with the engine's own `run_rounds` — the
same loop the simulation uses — one round per call, so that a round below quorum fails cleanly
(`QuorumNotMet`) and the next one starts. It contains no KD math and no MQTT code: it sequences,
persists and announces.

Every transition is written to the registry (`RegistryStore`) and announced as the retained
`rounds/{n}/status` + `rounds/current`:
    created -> collecting -> aggregating -> completed         (or -> failed: quorum / error)
After a completed round the strategy's state (large model, global small weights, version) is
saved atomically (tmp + os.replace) and registered as a model version; a restarted server loads
the newest one and resumes an unfinished round (accepted results are kept on disk, so devices
that already delivered are not asked again).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.engine.rounds import run_rounds
from server_app.engine.strategy import Strategy
from server_app.engine.types import RoundReport
from server_app.metrics_hook import record
from server_app.registry import crud
from server_app.registry.errors import RegistryUnavailable
from server_app.registry.session import Registry
from server_app.rounds.fleet import MqttFleet, Publish, QuorumNotMet, RoundAborted
from server_app.rounds.store import RegistryStore, StrategyCheckpoint

log = logging.getLogger("koala.orchestrator")
LARGE_ARCH = "large"


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat JSON scalars (finite) for the DB round row and the RoundStatus message: the contract's
    one finite-scalar cleaner, with nested {arch: acc} dicts flattened to `key.arch`."""
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):  # e.g. global_small_test_acc {arch: acc}
            flat.update({f"{k}.{a}": b for a, b in v.items()})
        else:
            flat[k] = v
    return cm.metrics_clean(flat)


# -------------------------------------------------------------------------------- orchestrator
class RoundOrchestrator:
    """Runs KOALA rounds in a background thread.

    Policy (`schedule_policy()`): `auto` runs rounds back to back until `rounds` have run, each once
    `min_devices` are online (with the policy's `min_devices_timeout_s`: any device after that long; default: wait). The API's RoundControl calls
    (`start_round`, `stop_round`, `set_schedule_policy`) adjust it at run time. `stop()` (server
    shutdown) interrupts a round without deciding it, so a restarted server resumes it.
    """

    def __init__(
        self,
        strategy: Strategy,
        fleet: MqttFleet,
        store: RegistryStore,
        publish: Publish,
        *,
        rounds: int,
        round_timeout_s: float,
        models_dir: str | Path,
        evaluate: Callable[[int], dict[str, Any]] | None = None,
        min_devices: int = 1,
        wait_devices_s: float | None = None,
        strategy_name: str | None = None,
        config: dict[str, Any] | None = None,
        on_report: Callable[[RoundReport], None] | None = None,
        before_round: Callable[[], None] | None = None,
        on_model: Callable[[int, int | None, dict[str, Any], dict[str, Any]], Any] | None = None,
    ):
        self.strategy = strategy
        self.fleet = fleet
        self.store = store
        self._publish = publish
        self.policy: dict[str, Any] = {"auto": True, "rounds": int(rounds), "min_devices": int(min_devices),
                                       "interval_s": 0.0}  # fmt: skip
        self.round_timeout_s = round_timeout_s
        self.checkpoint = StrategyCheckpoint(models_dir)
        self._evaluate = evaluate
        self.wait_devices_s = wait_devices_s
        self.strategy_name = strategy_name or str(getattr(strategy, "name", "strategy"))
        self.config = dict(config or {})
        self.on_report = on_report
        # called before each round picks its devices (services: revocations made by other processes)
        self._before_round = before_round
        # called after each published model version as on_model(version, round_id, metrics, strategy
        # state): the portable export users download (server_app.models.export.ModelExporter.publish)
        self._on_model = on_model
        self.model_version = 0
        self.reports: list[RoundReport] = []
        self.consecutive_failures = 0  # failed rounds in a row: the schedule backs off
        self.current_round: int | None = None
        self.state = "idle"  # idle | waiting_devices | running | finished | stopped | crashed
        self.next_round = 0
        self._requested = 0  # operator-requested extra rounds
        self._operator_abort: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_t0 = 0.0
        fleet._on_state = self._fleet_state  # the fleet reports collecting/aggregating through us

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="koala-orchestrator", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self.fleet.abort(shutdown=True)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        """Block until the automatic rounds ran (or the thread ended); True when finished."""
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        while self.alive and self.state != "finished":
            if t_end is not None and time.monotonic() > t_end:
                return False
            time.sleep(0.2)
        return self.state == "finished"

    # ---------------------------------------------------------------- main
    def resume_point(self) -> int:
        """Load the newest saved strategy state; return the round to run next (unfinished first)."""
        latest = self.store.latest_model("large", LARGE_ARCH)
        if latest is None:  # version 0 = the initial model: what a round-0 retry must restart from
            version = int(getattr(self.strategy, "version", 0))
            self.store.add_model("large", LARGE_ARCH, self.checkpoint.save(self.strategy, version), version, None, {})
            self._model_published(version, None, {})
        else:
            self.model_version = self.checkpoint.load(self.strategy, latest[1])
            log.info("strategy restored version=%d path=%s", self.model_version, latest[1])
            self._model_published(self.model_version, latest[2], {})  # exports one missing (written once)
        last = self.store.last_round()
        if last is None:
            return 0
        rid, state = last
        if state in cm.TERMINAL_ROUND_STATES:
            return rid + 1
        if latest is not None and latest[2] == rid:
            # died after saving this round's model but before marking it: do not distil it twice
            self.store.transition(rid, "completed")
            self._announce(rid, "completed")
            return rid + 1
        log.info("resuming round=%d state=%s", rid, state)
        return rid

    def _main(self) -> None:
        try:
            try:
                self.next_round = self.resume_point()
            except RegistryUnavailable as exc:
                log.warning("registry unavailable at start, waiting error=%s", exc)
                self._resume_after_outage()
            while not self._stop.is_set():
                if not self._due():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if not self._wait_for_devices():
                    continue
                try:
                    self._one_round(self.next_round)
                except RegistryUnavailable as exc:  # the DB is the truth: resume as after a restart
                    log.warning("registry unavailable, round will be resumed round=%d error=%s", self.next_round, exc)
                    self._resume_after_outage()
                    continue
                self._requested = max(0, self._requested - 1)
                self.next_round += 1
                if self.consecutive_failures:
                    # back off instead of spinning: 1, 2, 4 ... s, at most 60 s, after failed rounds
                    delay = min(60.0, 2.0 ** (self.consecutive_failures - 1))
                    log.info("backing off after failed rounds failures=%d delay_s=%.0f", self.consecutive_failures, delay)
                    self._stop.wait(delay)
                if self.policy["interval_s"] > 0:
                    self._stop.wait(self.policy["interval_s"])
            self.state = "stopped"
            log.info("orchestrator stopped rounds_run=%d", len(self.reports))
        except Exception:
            self.state = "crashed"
            log.exception("orchestrator crashed")

    def _resume_after_outage(self) -> None:
        """Reload the last saved strategy state and the round to run, once the registry answers."""
        while not self._stop.wait(2.0):
            try:
                self.next_round = self.resume_point()
                return
            except RegistryUnavailable:
                continue

    def _due(self) -> bool:
        """Run a round now? Automatic policy: until `rounds` ran; plus any operator request."""
        if self._requested > 0:
            return True
        if self.policy["auto"] and self.next_round < self.policy["rounds"]:
            return True
        self.state = "finished" if self.next_round >= self.policy["rounds"] else "idle"
        return False

    def _wait_for_devices(self) -> bool:
        if self._before_round is not None:
            try:
                self._before_round()
            except Exception:  # advisory: the registry being down is handled by the round itself
                log.warning("before-round hook failed", exc_info=True)
        self.state = "waiting_devices"
        t_end = None if self.wait_devices_s is None else time.monotonic() + self.wait_devices_s
        logged = False
        while not self._stop.is_set():
            n = len(self.fleet.devices())
            if n >= self.policy["min_devices"] or (n > 0 and t_end is not None and time.monotonic() > t_end):
                if n < self.policy["min_devices"]:
                    log.warning("starting round with %d of min_devices=%d online (policy min_devices_timeout_s=%s)",
                                n, self.policy["min_devices"], self.wait_devices_s)  # fmt: skip
                self.state = "running"
                return True
            if not logged and n > 0:
                logged = True
                log.info("waiting for devices: %d of min_devices=%d online", n, self.policy["min_devices"])
            self._stop.wait(0.2)
        return False

    def _one_round(self, n: int) -> None:
        self.current_round = n
        self._operator_abort = None
        self._round_t0 = time.perf_counter()
        state = self.store.ensure_round(n, self.strategy_name, self.config, self.model_version)
        if state == "created":
            self._announce(n, "created")
        try:
            reports = run_rounds(self.strategy, self.fleet, 1, evaluate=self._evaluate, progress=self._completed,
                                 timeout_s=self.round_timeout_s, start_round=n)  # fmt: skip
            self.reports.extend(reports)
        except RegistryUnavailable:
            raise
        except QuorumNotMet as exc:
            self._fail(n, f"quorum not met: {exc.accepted} accepted < {exc.quorum}")
        except RoundAborted:
            if self._operator_abort is not None:
                self.store.transition(n, "aborted", error=self._operator_abort)
                self._announce(n, "aborted", error=self._operator_abort)
                record("round_finished", "aborted")
            else:
                log.info("round interrupted by shutdown round=%d (resumed on restart)", n)
        except Exception as exc:  # a failing round must not end the service
            log.exception("round failed round=%d", n)
            self._fail(n, f"{type(exc).__name__}: {exc}"[:1000])
        finally:
            self.current_round = None

    # ------------------------------------------------------- RoundControl (API)
    def start_round(self, **overrides: Any) -> int:
        """Run one more round now (after the automatic ones); returns its id."""
        if self.current_round is not None:
            raise RuntimeError(f"round {self.current_round} is running")
        if not self.fleet.devices():
            raise RuntimeError("no device is online")
        if overrides:
            log.info("start_round overrides ignored: %s", sorted(overrides))
        self._requested += 1
        self._wake.set()
        return self.next_round

    def stop_round(self, round_id: int | None = None, reason: str = "stopped by operator") -> int:
        n = self.current_round
        if n is None or (round_id is not None and round_id != n):
            raise RuntimeError("no such round is running")
        self._operator_abort = reason
        self.fleet.abort()
        return n

    def schedule_policy(self) -> dict[str, Any]:
        return dict(self.policy)

    def set_schedule_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        unknown = set(policy) - set(self.policy)
        if unknown:
            raise ValueError(f"unknown policy keys {sorted(unknown)}; known: {sorted(self.policy)}")
        self.policy.update(policy)
        self._wake.set()
        return dict(self.policy)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "current_round": self.current_round, "next_round": self.next_round,
                "model_version": self.model_version, "rounds_run": len(self.reports), **self.policy}  # fmt: skip

    # ------------------------------------------------------------ transitions
    def _fleet_state(self, round_id: int, state: str, **info: Any) -> None:
        kw: dict[str, Any] = {}
        if "participants" in info:
            kw["participants"] = info["participants"]
        if "deadline" in info:
            kw["deadline"] = _utc(info["deadline"])
        self.store.transition(round_id, state, **kw)
        self._announce(round_id, state, deadline=info.get("deadline"))

    def _completed(self, report: RoundReport) -> None:
        """run_rounds' progress hook: the round aggregated and evaluated -> persist, then announce."""
        self.consecutive_failures = 0
        n = report.round_id
        m = report.metrics
        m.update(self.fleet.last_stats)
        m["t_server_kd_s"] = m.get("t_aggregate_s", 0.0)
        small = [acc for d in report.device_metrics.values() if isinstance(acc := d.get("test_acc"), float)]
        if small:  # held-out accuracy of the devices' small models, measured on the devices
            m["small_test_acc_mean"] = float(np.mean(small))
        m["t_round_wall_s"] = time.perf_counter() - self._round_t0
        version = int(getattr(self.strategy, "version", self.model_version + 1))
        path = self.checkpoint.save(self.strategy, version)
        flat = _scalars(m)
        self.store.add_model("large", LARGE_ARCH, path, version, n, {k: flat[k] for k in flat if "acc" in k})
        self.model_version = version
        self._model_published(version, n, flat)
        self.store.record_metrics(n, flat)
        self.store.transition(n, "completed", metrics=flat)
        self._announce(n, "completed", metrics=flat)
        record("round_finished", "completed")
        record("round_metrics", large_acc=flat.get("large_test_acc"), small_acc=flat.get("small_test_acc_mean"),
              kd_loss=flat.get("rkd_loss"), round_id=n)
        for phase, key in (("collect", "t_collect_s"), ("aggregate", "t_aggregate_s"), ("configure", "t_configure_s")):
            if isinstance(flat.get(key), float):
                record("observe_phase", phase, flat[key])
        log.info("round completed round=%d version=%d large_acc=%s accepted=%s t_round_s=%.2f", n, version,
                 flat.get("large_test_acc"), flat.get("accepted"), flat["t_round_wall_s"])
        if self.on_report is not None:
            self.on_report(report)

    def _model_published(self, version: int, round_id: int | None, metrics: dict[str, Any]) -> None:
        """The on_model hook; best effort: an export failure must not fail a round that completed."""
        if self._on_model is None:
            return
        try:
            self._on_model(version, round_id, {k: v for k, v in metrics.items() if "_acc" in k}, self.strategy.state_dict())
        except Exception:
            log.exception("on_model hook failed version=%d", version)

    def _fail(self, n: int, error: str) -> None:
        self.consecutive_failures += 1
        log.warning("round failed round=%d error=%s", n, error)
        self.store.transition(n, "failed", error=error, metrics=_scalars(self.fleet.last_stats))
        self._announce(n, "failed", error=error)
        record("round_finished", "failed")

    def _announce(self, n: int, state: str, *, metrics: dict[str, Any] | None = None, error: str | None = None,
                  deadline: float | None = None) -> None:
        """Retained rounds/{n}/status and rounds/current (what monitors and devices read)."""
        try:
            c = self.store.counts(n)
            col = self.fleet.collection
            msg = cm.RoundStatus(
                round_id=n, state=state, strategy=self.strategy_name,
                participants=sorted(col.participants) if col is not None and col.round_id == n else [],
                received=c.get("received", 0), accepted=c.get("accepted", 0), rejected=c.get("rejected", 0),
                deadline=deadline, metrics={k: v for k, v in (metrics or {}).items() if not isinstance(v, str)},
                error=error,
            )  # fmt: skip
            payload = codec.encode_control(msg)
            self._publish(topics.round_status(n), payload, 1, True)
            self._publish(topics.rounds_current(), payload, 1, True)
        except Exception:  # announcing is best effort; the DB row is the truth
            log.exception("could not announce round=%d state=%s", n, state)


def restore_schedule_policy(registry: Registry, orch: RoundOrchestrator | None) -> dict[str, Any] | None:
    """At server start: re-apply the schedule policy last PUT through the API (None when there is none).
    Called by ServerServices once its orchestrator exists; an unknown key from an older server is
    dropped, not fatal."""
    with registry.session() as s:
        saved = crud.get_setting(s, crud.SCHEDULE_POLICY)
    if not saved or orch is None:
        return None
    known = set(orch.schedule_policy())
    return orch.set_schedule_policy({k: v for k, v in saved.items() if k in known})
