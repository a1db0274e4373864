"""Per-device message budgets, checked on the MQTT network thread before anything is decoded.

Why: the broker's ACL lets a device publish on its own topics as often as it likes, and everything
it publishes lands in the one queue and the one network thread that also carry every other device's
results. A flood within those grants (results with a fresh round id on every message, progress at
QoS 0, retained status) used to be decoded, checked and written to the registry message by message,
while the broker dropped the server's overflowing queue — honest results among it. Here each
device gets a budget per message kind and what is over it costs a dict lookup and a counter:

  result    `results_per_round` messages per device between two round openings, whatever round id
            they claim (a fresh id per message no longer buys a fresh allowance);
  progress  a token bucket: `progress_per_s` sustained, `progress_burst` at once;
  predict   a token bucket: `predict_per_s`, `predict_burst` (the cascade's requests; over it dropped
            unanswered: the device answers with its own model);
  status    a token bucket: `status_per_s`, `status_burst`. Status is retained state, so an
            over-budget status is not lost but *deferred*: the newest one per device is kept and
            applied when the bucket refills (a device's Last Will always takes effect).

Dropped messages are counted per device and kind (`dropped`, on /metrics) and recorded as at most
one registry event per device and `event_window_s` (`due_events`), never one row per message.
Memory is bounded by the number of devices seen (cleared past `MAX_TRACKED`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("result", "progress", "status", "predict")
MAX_TRACKED = 100_000  # devices tracked per table before it is reset (a flood of made-up ids, dev broker)


@dataclass(frozen=True)
class Budgets:
    """Limits per device (documented in asyncapi.yaml and docs/security.md). An honest agent sends
    one result per round (plus QoS 1 redeliveries), a handful of progress messages per phase and a
    status on connect and after each round: these leave it a wide margin."""

    results_per_round: int = 8
    progress_per_s: float = 5.0
    progress_burst: int = 50
    status_per_s: float = 0.5
    status_burst: int = 10
    # cascade predict requests (devices/<id>/up/predict, opt-in per device): a token bucket like progress
    predict_per_s: float = 5.0
    predict_burst: int = 20
    event_window_s: float = 60.0
    # a device that has this many messages dropped within one event window is flooding: the server
    # asks the broker to shut it out for `quarantine_s` (server_app.quarantine), so the flood stops
    # at the broker instead of filling the server's queue (0: never)
    quarantine_after: int = 200
    quarantine_s: float = 60.0


class _Bucket:
    __slots__ = ("tokens", "t")

    def __init__(self, tokens: float, t: float) -> None:
        self.tokens, self.t = tokens, t


class DeviceBudget:
    """`allow(kind, device_id)` on the network thread; `take_deferred()` and `due_events()` from a
    housekeeping thread. `epoch()` names the round being collected (None between rounds): a result
    allowance is renewed when it changes."""

    def __init__(self, budgets: Budgets | None = None, epoch: Callable[[], int | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, on_flood: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.b = budgets or Budgets()
        # called once (on the network thread: must not block) when a device's drops in the current
        # window reach `quarantine_after`; armed again by `rearm` or when the window's event is taken
        self.on_flood = on_flood
        self._strikes: Counter[str] = Counter()
        self._epoch = epoch
        self._clock = clock
        self._lock = threading.Lock()
        self._results: dict[str, tuple[int | None, int]] = {}  # device -> (epoch, results seen in it)
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # (kind, device) -> token bucket
        self._deferred: dict[str, tuple[str, bytes]] = {}  # device -> newest over-budget status
        self.dropped: Counter[tuple[str, str]] = Counter()  # (kind, device) -> dropped since start
        self._window: Counter[tuple[str, str]] = Counter()  # (kind, device) -> dropped since its last event
        self._last_event: dict[str, float] = {}  # device -> when its last event was due

    # ------------------------------------------------------------------ network thread
    def allow(self, kind: str, device_id: str | None) -> bool:
        """True: handle the message; False: over budget (counted; drop it without decoding)."""
        dev = device_id or "?"
        flood = False
        with self._lock:
            ok = self._allow_result(dev) if kind == "result" else self._take_token(kind, dev)
            if not ok:
                self.dropped[(kind, dev)] += 1
                self._window[(kind, dev)] += 1
                if len(self._strikes) > MAX_TRACKED:
                    self._strikes.clear()
                self._strikes[dev] += 1
                flood = self._strikes[dev] == self.b.quarantine_after
        if not ok and flood and self.on_flood is not None:
            self.on_flood(dev)
        return ok

    def defer_status(self, device_id: str, topic: str, payload: bytes) -> None:
        """Keep the newest over-budget status of a device; applied later by `take_deferred`."""
        with self._lock:
            if len(self._deferred) > MAX_TRACKED:
                self._deferred.clear()
            self._deferred[device_id] = (topic, payload)

    def _allow_result(self, dev: str) -> bool:
        epoch = self._epoch()
        seen_epoch, n = self._results.get(dev, (epoch, 0))
        if seen_epoch != epoch:
            n = 0
        if len(self._results) > MAX_TRACKED:
            self._results.clear()
        self._results[dev] = (epoch, n + 1)
        return n < self.b.results_per_round

    def _take_token(self, kind: str, dev: str) -> bool:
        rate, burst = {"progress": (self.b.progress_per_s, self.b.progress_burst),
                       "predict": (self.b.predict_per_s, self.b.predict_burst)}.get(kind, (
            self.b.status_per_s, self.b.status_burst))  # fmt: skip
        now = self._clock()
        bucket = self._buckets.get((kind, dev))
        if bucket is None:
            if len(self._buckets) > MAX_TRACKED:
                self._buckets.clear()
            bucket = self._buckets[(kind, dev)] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.t) * rate)
        bucket.t = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    # ------------------------------------------------------------------ housekeeping thread
    def take_deferred(self) -> list[tuple[str, bytes]]:
        """Deferred statuses whose device has a token again (each takes one)."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for dev in list(self._deferred):
                if self._take_token("status", dev):
                    out.append(self._deferred.pop(dev))
        return out

    def due_events(self) -> list[tuple[str, dict[str, int]]]:
        """(device, {kind: dropped}) for each device with drops whose last event is at least
        `event_window_s` old: at most one registry event per device and window."""
        now = self._clock()
        due: dict[str, dict[str, int]] = {}
        with self._lock:
            for (kind, dev), n in list(self._window.items()):
                if now - self._last_event.get(dev, -1e18) < self.b.event_window_s:
                    continue
                due.setdefault(dev, {})[kind] = n
            for dev, kinds in due.items():
                self._last_event[dev] = now
                for kind in kinds:
                    del self._window[(kind, dev)]
                if self._strikes[dev] < self.b.quarantine_after:  # a flooder stays struck until rearm()
                    del self._strikes[dev]
        return sorted(due.items())

    def rearm(self, device_id: str) -> None:
        """Count the device's drops from zero again (its quarantine ended)."""
        with self._lock:
            self._strikes.pop(device_id, None)

    def dropped_snapshot(self) -> dict[tuple[str, str], int]:
        """(kind, device) -> messages dropped since start (a copy: safe to read from any thread)."""
        with self._lock:
            return dict(self.dropped)

    def dropped_total(self) -> dict[str, int]:
        """Messages dropped per kind (all devices)."""
        with self._lock:
            out = dict.fromkeys(KINDS, 0)
            for (kind, _dev), n in self.dropped.items():
                out[kind] += n
            return out


def topic_device(topic: str) -> str | None:
    """The device id of `koala/v1/devices/<id>/up/<kind>` by splitting, not validating: the budget
    key must cost nothing (a bad id is refused properly when the message is decoded)."""
    parts = topic.split("/", 4)
    return parts[3] if len(parts) >= 4 and parts[2] == "devices" else None
