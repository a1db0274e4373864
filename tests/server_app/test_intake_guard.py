"""Per-device budgets, the coalescing status writer, the quarantine and the intake watchdog, on
their own (the flood over a real broker: tests/reliability/test_flood.py)."""

from __future__ import annotations

import threading

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.ingest_budget import Budgets, DeviceBudget, topic_device
from server_app.intake_watchdog import IntakeWatchdog
from server_app.quarantine import Quarantine
from server_app.status_writer import StatusWriter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_topic_device_splits_without_validating() -> None:
    assert topic_device(topics.device_result("dev-7")) == "dev-7"
    assert topic_device(topics.device_status("a.b_c")) == "a.b_c"
    assert topic_device("koala/v1/server/status") is None


def test_results_budget_is_per_round_epoch_whatever_round_id_is_claimed() -> None:
    epoch = [3]
    b = DeviceBudget(Budgets(results_per_round=8), epoch=lambda: epoch[0])
    assert all(b.allow("result", "evil") for _ in range(8))
    assert not any(b.allow("result", "evil") for _ in range(1000))  # fresh round ids in the payload change nothing
    assert b.allow("result", "honest")  # another device has its own allowance
    epoch[0] = 4  # a new round opens: allowances renew
    assert b.allow("result", "evil")
    assert b.dropped_snapshot() == {("result", "evil"): 1000}


def test_progress_and_status_token_buckets_refill_with_time() -> None:
    clock = Clock()
    b = DeviceBudget(Budgets(progress_per_s=5.0, progress_burst=10, status_per_s=0.5, status_burst=2), clock=clock)
    assert sum(b.allow("progress", "d") for _ in range(100)) == 10
    clock.t += 1.0
    assert sum(b.allow("progress", "d") for _ in range(100)) == 5
    assert sum(b.allow("status", "d") for _ in range(10)) == 2
    clock.t += 2.0
    assert sum(b.allow("status", "d") for _ in range(10)) == 1
    assert b.dropped_total() == {"result": 0, "progress": 185, "status": 17, "predict": 0}


def test_over_budget_events_at_most_one_per_device_and_window() -> None:
    clock = Clock()
    b = DeviceBudget(Budgets(progress_burst=1, event_window_s=60.0), clock=clock)
    for _ in range(50):
        b.allow("progress", "d")
    assert b.due_events() == [("d", {"progress": 49})]
    for _ in range(50):
        b.allow("progress", "d")
    assert b.due_events() == []  # same window: nothing new to write
    clock.t += 61
    assert b.due_events() == [("d", {"progress": 50})]


def test_flood_callback_fires_once_at_the_threshold_until_rearmed() -> None:
    hits: list[str] = []
    b = DeviceBudget(Budgets(results_per_round=1, quarantine_after=10), on_flood=hits.append)
    for _ in range(100):
        b.allow("result", "evil")
    assert hits == ["evil"]
    b.rearm("evil")
    for _ in range(10):
        b.allow("result", "evil")
    assert hits == ["evil", "evil"]


class FakeStore:
    """The two registry calls the writer makes, recorded (the registry itself: test_flood)."""

    def __init__(self) -> None:
        self.statuses: list[list[cm.DeviceStatus]] = []
        self.events: list[tuple[str, dict[str, int]]] = []

    def device_statuses(self, batch: list[cm.DeviceStatus]) -> None:
        self.statuses.append(batch)

    def over_budget_events(self, rows: list[tuple[str, dict[str, int]]], window_s: float) -> None:
        self.events += rows


def test_status_writer_coalesces_a_status_flood_into_one_row_per_device() -> None:
    store = FakeStore()
    w = StatusWriter(store)
    for i in range(1000):
        w.put(cm.DeviceStatus(device_id="evil", num_samples=i + 1, arch="cnn_small"))
    w.put(cm.DeviceStatus(device_id="honest", arch="cnn_small"))
    w.tick()
    (batch,) = store.statuses
    assert sorted(s.device_id for s in batch) == ["evil", "honest"]
    assert next(s for s in batch if s.device_id == "evil").num_samples == 1000  # the newest wins


def test_deferred_status_is_applied_when_the_bucket_refills() -> None:
    """A Last Will that arrives over budget is not lost: it is applied later."""
    clock = Clock()
    b = DeviceBudget(Budgets(status_per_s=0.5, status_burst=1), clock=clock)
    applied: list[bytes] = []
    w = StatusWriter(FakeStore(), b, apply_deferred=lambda t, p: applied.append(p))
    offline = codec.encode_control(cm.DeviceStatus(device_id="d", state="offline"))
    assert b.allow("status", "d")
    assert not b.allow("status", "d")
    b.defer_status("d", topics.device_status("d"), offline)
    w.tick()
    assert applied == []
    clock.t += 2.0
    w.tick()
    assert applied == [offline]


class FakeControl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.done = threading.Event()

    def disable_client(self, u: str) -> None:
        self.calls.append(("disable", u))

    def enable_client(self, u: str) -> None:
        self.calls.append(("enable", u))
        self.done.set()


def test_quarantine_disables_then_enables_and_survives_a_restart(tmp_path) -> None:
    control, rearmed = FakeControl(), []
    now = [100.0]
    q = Quarantine(control, tmp_path / "q.json", quarantine_s=30, rearm=rearmed.append, clock=lambda: now[0])
    q._shut_out("evil")
    assert control.calls == [("disable", "evil")] and q.active() == {"evil": 130.0}
    q2 = Quarantine(control, tmp_path / "q.json", clock=lambda: now[0])  # a restarted server
    assert q2.active() == {"evil": 130.0}
    now[0] = 131.0
    q2._lift_due()
    assert control.calls[-1] == ("enable", "evil") and q2.active() == {}
    assert Quarantine(control, tmp_path / "q.json").active() == {}


class FakeLink:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.last_delivery_at = 0.0
        self.connected_at = 0.0
        self.published: list[str] = []
        self.reconnects = 0
        self.subs: dict[str, object] = {}

    def subscribe(self, f: str, qos: int, handler: object) -> None:
        self.subs[f] = handler

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        self.published.append(topic)
        return True

    def force_reconnect(self) -> bool:
        self.reconnects += 1
        return True


def test_watchdog_reports_a_silent_link_reconnects_and_sees_it_recover() -> None:
    clock, link = Clock(), FakeLink()
    dog = IntakeWatchdog(link, interval_s=5, stall_s=30, clock=clock)
    link.subscribe(dog.topic, 1, dog._on_probe)
    dog.last_probe_at = link.connected_at = clock()
    clock.t += 5
    dog.check()
    assert dog.healthy
    clock.t += 11
    dog.check()
    assert not dog.stalled and link.reconnects == 0
    assert not dog.healthy  # two probes overdue: /readyz says degraded before the watchdog acts
    clock.t += 19  # 35 s without a probe or any delivery
    dog.check()
    assert dog.stalled and link.reconnects == 1 and dog.stalls == 1
    dog._on_probe(dog.topic, b"probe")  # the new connection delivers
    assert not dog.stalled and dog.recoveries == 1


def test_watchdog_does_not_call_a_busy_link_stalled() -> None:
    """A long legitimate backlog delays the probe, but results keep arriving: not a stall."""
    clock, link = Clock(), FakeLink()
    dog = IntakeWatchdog(link, stall_s=30, clock=clock)
    dog.last_probe_at = clock()
    for _ in range(20):
        clock.t += 5
        link.last_delivery_at = clock.t - 1
        dog.check()
    assert not dog.stalled and link.reconnects == 0


def test_watchdog_revives_a_dead_ingest_worker() -> None:
    from server_app.ingest_worker import IngestWorker

    worker = IngestWorker(lambda items: [])
    assert not worker.alive
    IntakeWatchdog(FakeLink(), worker=lambda: worker).check()
    assert worker.alive
    worker.stop()
