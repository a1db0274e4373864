"""Intake liveness: prove end to end that the broker still delivers to this server, and cure it.

Why: a server can sit connected to its broker and receive nothing — its inflight window full of
deliveries it will never acknowledge, a half-open TCP connection, a network thread stuck — while
`/readyz` said ok and every round failed for want of results until someone restarted it. Being
connected proves nothing; a delivery does. Every `interval_s` this watchdog publishes a probe on
a topic the link itself subscribes to (QoS 1, through the same broker queue as the results). The
intake counts as *stalled* when, for `stall_s`, neither a probe nor any other message came back
while the link was connected: a busy link (a long legitimate backlog delaying the probe) keeps
delivering results and is not stalled. Then it:
  1. reports it (`stalled`: `koala_intake_stalled` 1, an error in the log; /readyz is degraded
     already from the moment a probe is two intervals overdue, `healthy`);
  2. drops the connection as a network fault would (`MqttClient.force_reconnect`): paho reconnects,
     re-subscribes, and the broker starts a fresh session with an empty window;
  3. restarts the ingest worker's thread if it died.
It counts a recovery once a probe arrives again. Probes use `koala/v1/server/#`, the server's own
namespace (granted to the server account, nobody else).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from device_firmware_py.contract import topics
from server_app.metrics_hook import record

log = logging.getLogger("koala.ingest.watchdog")
INTERVAL_S = 5.0
STALL_S = 30.0


class IntakeWatchdog:
    """`start()` after the link is up; `stop()`; `stalled` for readiness; counters for metrics."""

    def __init__(self, link: Any, *, worker: Callable[[], Any] = lambda: None, interval_s: float = INTERVAL_S,
                 stall_s: float = STALL_S, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.link = link
        self._worker = worker  # () -> the IngestWorker (or None): revived if its thread died
        self.interval_s = interval_s
        self.stall_s = stall_s
        self._clock = clock
        self.topic = f"{topics.PREFIX}/server/intake-probe-{secrets.token_hex(4)}"
        self.last_probe_at = clock()  # when a probe last came back (start counts as one)
        self.stalled = False
        self.stalls = 0  # stalls detected (each one cured by a reconnect)
        self.recoveries = 0  # stalls after which a probe came back
        self.probes_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IntakeWatchdog:
        self.link.subscribe(self.topic, 1, self._on_probe)
        self._thread = threading.Thread(target=self._run, name="koala-intake-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _on_probe(self, _topic: str, _payload: bytes) -> None:
        self.last_probe_at = self._clock()
        if self.stalled:
            self.stalled = False
            self.recoveries += 1
            record("intake_stalled", False)
            log.warning("intake recovered: the broker delivers to this server again (recovery %d)", self.recoveries)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive anything it watches
                log.exception("intake watchdog check failed")

    @property
    def healthy(self) -> bool:
        """What /readyz reports: no stall, and no probe overdue by more than two intervals (a link
        going silent shows as degraded from then on, before the watchdog acts at `stall_s`)."""
        return not self.stalled and self.silent_s() < 3 * self.interval_s

    def silent_s(self) -> float:
        """Seconds since the link last delivered anything (a probe, a result, a status)."""
        last = max(self.last_probe_at, float(getattr(self.link, "last_delivery_at", 0.0)),
                   float(getattr(self.link, "connected_at", 0.0)))  # fmt: skip
        return self._clock() - last

    def check(self) -> None:
        """One watchdog step: revive a dead worker, send a probe, judge the silence."""
        worker = self._worker()
        if worker is not None and hasattr(worker, "revive"):
            worker.revive()
        if not self.link.connected.is_set():
            return  # paho is reconnecting by itself; readiness already says mqtt down
        self.link.publish(self.topic, b"probe", 1, False)
        self.probes_sent += 1
        silent = self.silent_s()
        if silent < self.stall_s:
            return
        if not self.stalled:
            self.stalled = True
            self.stalls += 1
            record("intake_stalled", True)
        log.error("intake stalled: connected to the broker but nothing delivered for %.0f s (probes included); "
                  "dropping the connection to start a fresh session (stall %d)", silent, self.stalls)  # fmt: skip
        self.link.force_reconnect()
        self.last_probe_at = self._clock()  # give the new connection a full stall_s before judging again
