"""Device status reaches the registry off the MQTT thread, coalesced; budget events, one per window.

Why: every retained status used to be one registry transaction on paho's network thread. A device
re-publishing its status a few thousand times a second (within its ACL) kept that thread writing
rows, the broker's queue for the server overflowed, and honest results queued behind the status
flood were dropped. Now the network thread only updates the in-memory `Presence` (what rounds
read) and leaves the message here; this thread writes the newest status of each device that
changed, all in one transaction, every `interval_s`. A device that sends a thousand statuses in
that time costs one row update.

The same tick applies statuses the budget deferred (server_app.ingest_budget: the newest one per
device, once its bucket refills) and records the budget's over-budget events (at most one per
device and window).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from device_firmware_py.contract import messages as cm
from server_app.ingest_budget import DeviceBudget

log = logging.getLogger("koala.ingest.status")


class StatusWriter:
    """`put(status)` from any thread; `start()`; `stop()` writes what is pending."""

    def __init__(self, store: Any, budget: DeviceBudget | None = None,
                 apply_deferred: Callable[[str, bytes], Any] | None = None, interval_s: float = 0.5) -> None:  # fmt: skip
        self.store = store
        self.budget = budget
        self._apply_deferred = apply_deferred  # the status handler, for statuses the budget deferred
        self.interval_s = interval_s
        self._pending: dict[str, cm.DeviceStatus] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0  # status rows written (tests, logs)
        self.received = 0  # statuses handed over (a flood shows as received >> written)

    def put(self, status: cm.DeviceStatus) -> None:
        with self._lock:
            self._pending[status.device_id] = status
            self.received += 1

    def start(self) -> StatusWriter:
        self._thread = threading.Thread(target=self._run, name="koala-status", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.tick()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # housekeeping must outlive any one failure (registry down: next tick)
                log.exception("status writer tick failed")

    def tick(self) -> None:
        """Apply deferred statuses, write pending ones, record due budget events."""
        if self.budget is not None and self._apply_deferred is not None:
            for topic, payload in self.budget.take_deferred():
                self._apply_deferred(topic, payload)
        with self._lock:
            batch, self._pending = list(self._pending.values()), {}
        if batch:
            try:
                self.store.device_statuses(batch)
                self.written += len(batch)
            except Exception:
                log.warning("could not write %d device statuses (kept for the next tick)", len(batch), exc_info=True)
                with self._lock:
                    for st in batch:  # a newer status that arrived meanwhile wins
                        self._pending.setdefault(st.device_id, st)
        if self.budget is not None:
            events = self.budget.due_events()
            if events:
                for dev, dropped in events:
                    log.warning("over budget device=%s dropped=%s (window %.0f s)", dev, dropped,
                                self.budget.b.event_window_s)  # fmt: skip
                try:
                    self.store.over_budget_events(events, self.budget.b.event_window_s)
                except Exception:
                    log.warning("could not record %d over-budget events", len(events), exc_info=True)
