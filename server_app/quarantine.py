"""Broker-side quarantine of a flooding device: the flood stops at the broker, not in our queue.

Why: dropping over-budget messages on the server is cheap, but every one of them still travels
through the broker's queue for the server, and that queue is shared with every honest device's
results. A device publishing within its ACL as fast as it can (thousands of messages a second)
fills it in about a second, and the broker then drops what is queued for the server — honest
results among them. Mosquitto 2.0 has no per-client publish rate limit. Its dynamic-security plugin
can disable an account, though: `disableClient` disconnects the live session and refuses new
logins. So when the budget reports a device as flooding (server_app.ingest_budget: `quarantine_after`
drops in one window) this module disables that device's account for `quarantine_s`, records an
event, counts it on /metrics and enables the account again afterwards. An honest device never gets
near the threshold; a buggy one loses `quarantine_s` of work.

It needs the broker's admin account (`broker.provision_dir`, as REST revoke does). Without it
(the embedded development broker, anonymous Mosquitto) only the server-side budget applies, and
the server says so once at start. Quarantines in force are kept in `<data_dir>/quarantine.json`
so a restarted server lifts the ones that are due.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_firmware_py.fileio import atomic_write
from server_app.metrics_hook import record

log = logging.getLogger("koala.ingest.quarantine")


class Quarantine:
    """`flood(device)` from any thread (never blocks); `start()`; `stop()`."""

    def __init__(self, control: Any, state_file: Path, *, quarantine_s: float = 60.0,
                 rearm: Callable[[str], None] = lambda _d: None, event: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.control = control  # dynsec.BrokerControl (disable_client / enable_client)
        self.state_file = state_file
        self.quarantine_s = quarantine_s
        self._rearm = rearm
        self._event = event  # store.event(kind, **kw): the registry's audit trail
        self._clock = clock
        self._q: queue.Queue[str] = queue.Queue(maxsize=10_000)
        self._until: dict[str, float] = self._load()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.quarantined = 0  # devices shut out since start (tests, metrics)
        self.failures = 0

    def flood(self, device_id: str) -> None:
        try:
            self._q.put_nowait(device_id)
        except queue.Full:
            log.warning("quarantine queue full: device=%s not shut out", device_id)

    def start(self) -> Quarantine:
        self._thread = threading.Thread(target=self._run, name="koala-quarantine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def active(self) -> dict[str, float]:
        """device -> unix time its quarantine ends."""
        return dict(self._until)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                dev = self._q.get(timeout=0.5)
            except queue.Empty:
                dev = None
            try:
                if dev is not None and dev not in self._until:
                    self._shut_out(dev)
                self._lift_due()
            except Exception:  # the broker being unreachable must not end quarantining
                log.exception("quarantine step failed")

    def _shut_out(self, dev: str) -> None:
        try:
            self.control.disable_client(dev)
        except Exception as exc:
            self.failures += 1
            log.error("could not quarantine flooding device=%s at the broker: %s", dev, exc)
            self._rearm(dev)
            return
        self._until[dev] = self._clock() + self.quarantine_s
        self._save()
        self.quarantined += 1
        record("device_quarantined")
        log.error("device=%s flooded the server past its budget: account disabled at the broker for %.0f s", dev,
                  self.quarantine_s)  # fmt: skip
        if self._event is not None:
            try:
                self._event("quarantined", level="error", device_id=dev,
                            detail={"reason": "over_budget", "seconds": self.quarantine_s})  # fmt: skip
            except Exception:
                log.warning("could not record the quarantine of device=%s", dev, exc_info=True)

    def _lift_due(self) -> None:
        now = self._clock()
        for dev, until in list(self._until.items()):
            if until > now:
                continue
            try:
                self.control.enable_client(dev)
            except Exception as exc:
                log.warning("could not end the quarantine of device=%s yet: %s", dev, exc)
                continue
            del self._until[dev]
            self._save()
            self._rearm(dev)
            log.warning("device=%s quarantine over: account enabled at the broker", dev)

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.state_file.read_text())
            return {str(k): float(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable %s: starting with no quarantines", self.state_file)
            return {}

    def _save(self) -> None:
        atomic_write(self.state_file, json.dumps(self._until, sort_keys=True).encode())
