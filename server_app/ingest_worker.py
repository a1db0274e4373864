"""Result ingestion off the MQTT thread, in batches, acknowledged only after the batch is durable.

Why: ingesting one message at a time on paho's network thread (decode, registry read, fsync'd
file, two commits) capped the server at a few dozen results/s, and the broker dropped what queued
up behind it. Here the MQTT handler only enqueues `(topic, payload, ack)`; one worker thread takes
what has arrived (up to `max_batch`), runs `Ingestor.ingest_batch` (one read, one fsync, one
transaction) and only then calls the acks. Until then the broker counts the messages as in flight,
and its inflight window (`max_inflight_messages`) should stop further deliveries. It does not always:
`koala bench fleet_scale` measured Mosquitto 2.0.11 (max_inflight_messages 100) handing the server
1,000+ unacknowledged results during a 3,000-device round, and the queue with them (100 kB each)
was most of the server's peak memory. So the worker bounds its own queue: at `max_backlog` the
handler holds paho's network thread (at most `hold_s` per delivery) until the worker has taken a
batch; while it is held nothing is read from the socket, and TCP pushes back to the broker, which
keeps the rest. Memory for queued results is then bounded by `max_backlog`, whatever the broker does.

If the registry is unavailable the batch is kept and retried (0.5 s doubling to 5 s) and nothing is
acknowledged, so an outage loses nothing and needs no in-memory queue of its own.
Use `subscribe_results` to wire it (the server, the benchmarks and the tests share it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from server_app.ingest_budget import DeviceBudget, topic_device
from server_app.metrics_hook import record
from server_app.registry.errors import RegistryUnavailable

log = logging.getLogger("koala.ingest.worker")
MAX_BATCH = 256
MAX_BACKLOG = 2 * MAX_BATCH  # results queued in memory before the MQTT thread stops reading
HOLD_S = 5.0  # longest one delivery holds the MQTT thread (keepalive pings go out in between)
Item = tuple[str, bytes, Callable[[], None]]


class IngestWorker:
    """`submit` from the MQTT handler; `start()`; `stop()` on shutdown."""

    def __init__(
        self,
        ingest: Callable[[Sequence[tuple[str, bytes]]], list[Any]],
        *,
        max_batch: int = MAX_BATCH,
        on_outcomes: Callable[[list[Any]], None] | None = None,
        backoff_s: tuple[float, float] = (0.5, 5.0),
        max_backlog: int = MAX_BACKLOG,
        hold_s: float = HOLD_S,
    ) -> None:
        self._ingest = ingest
        self.max_batch = max_batch
        self.max_backlog = max(1, max_backlog)
        self.hold_s = hold_s
        self._room = threading.Condition()  # notified when the worker takes a batch off the queue
        self.holds = 0  # deliveries that waited for room (backpressure; tests, logs)
        self.peak_backlog = 0
        self._on_outcomes = on_outcomes
        self._backoff = backoff_s
        self._q: queue.Queue[Item] = queue.Queue()
        self._stop = threading.Event()  # finish what is queued, then exit
        self._abort = threading.Event()  # exit now, leaving the current batch unacknowledged
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches committed (tests, logs)
        self.received = 0  # messages handed to the worker
        self.retries = 0  # registry-unavailable retries

    def submit(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        """The MQTT handler (deferred_ack): never blocks, never touches the registry."""
        self.received += 1
        self._q.put((topic, payload, ack))
        n = self._q.qsize()
        self.peak_backlog = max(self.peak_backlog, n)
        if n >= self.max_backlog:
            self._wait_for_room()

    def _wait_for_room(self) -> None:
        """Backpressure: hold the calling (MQTT network) thread until the queue is below half of
        `max_backlog`, the worker stops, or `hold_s` passes (a stuck registry must not stall the
        connection past its keepalive; the next delivery holds again, so the queue grows by at
        most one message per `hold_s` meanwhile)."""
        self.holds += 1
        record("ingest_backpressure")  # also counted in `holds`
        t_end = time.monotonic() + self.hold_s
        with self._room:
            while self._q.qsize() > self.max_backlog // 2 and not self._abort.is_set():
                left = t_end - time.monotonic()
                if left <= 0:
                    log.warning("ingest backlog %d >= %d for %.0fs: reading on", self._q.qsize(), self.max_backlog,
                                self.hold_s)  # fmt: skip
                    return
                self._room.wait(min(left, 0.5))

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    @property
    def alive(self) -> bool:
        """The worker thread runs (False before start() and after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def revive(self) -> bool:
        """Start a new worker thread on the same queue if the old one died (a bug that escaped
        `_process`); what was queued is ingested by the new one. True if one was started."""
        if self.alive or self._stop.is_set():
            return False
        log.error("ingest worker thread had died with %d results queued: started a new one", self.backlog)
        self.start()
        return True

    def start(self) -> IngestWorker:
        self._thread = threading.Thread(target=self._run, name="koala-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Ingest what is queued and exit; after timeout_s (e.g. the registry is still down) give
        up, leaving those messages unacknowledged for the broker. True if everything was drained."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(5.0)
            log.warning("ingest worker stopped with %d results unacknowledged", self.backlog)
            return False
        return True

    # ---- worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._abort.is_set():
            try:
                first = self._q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            with self._room:
                self._room.notify_all()
            self._process(batch)

    def _process(self, batch: list[Item]) -> None:
        items = [(t, p) for t, p, _ in batch]
        delay = self._backoff[0]
        while True:
            try:
                outs = self._ingest(items)
                break
            except RegistryUnavailable as exc:
                self.retries += 1
                log.warning("registry unavailable, batch of %d kept unacknowledged, retry in %.1fs: %s",
                            len(batch), delay, exc)  # fmt: skip
                if self._abort.wait(delay):
                    return  # shutting down: leave the batch to the broker
                delay = min(self._backoff[1], delay * 2)
            except Exception:  # ingest_batch records bugs itself; this is a last resort
                log.exception("ingest worker: batch of %d failed, acknowledged to avoid a redelivery loop", len(batch))
                outs = []
                break
        self.batches += 1
        for _t, _p, ack in batch:
            ack()
        if self._on_outcomes is not None and outs:
            try:
                self._on_outcomes(outs)
            except Exception:
                log.exception("on_outcomes callback failed")


def subscribe_results(link: Any, topic_filter: str, ingestor: Any, *, max_batch: int = MAX_BATCH,
                      on_outcomes: Callable[[list[Any]], None] | None = None,
                      budget: DeviceBudget | None = None) -> IngestWorker:
    """Start a worker for `ingestor` and subscribe `topic_filter` (QoS 1) on `link`, an
    `MqttClient(manual_ack=True)`: the one way results are wired (server, benchmarks, tests).
    With a `budget`, a result over its device's budget is acknowledged and dropped right here, on
    the network thread, before it is queued, decoded or written (server_app.ingest_budget)."""
    worker = IngestWorker(ingestor.ingest_batch, max_batch=max_batch, on_outcomes=on_outcomes).start()
    if budget is None:
        link.subscribe(topic_filter, 1, worker.submit, deferred_ack=True)
        return worker

    def gated(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if budget.allow("result", topic_device(topic)):
            worker.submit(topic, payload, ack)
        else:
            ack()

    link.subscribe(topic_filter, 1, gated, deferred_ack=True)
    return worker
